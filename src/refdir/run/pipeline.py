"""``refdir run``: the stage table (:data:`refdir.run.stages.STAGES`) run over a run folder.

Each stage writes its artifact into the run folder (atomically) together with the hash of its
inputs in ``stages.json``. A stage whose inputs are unchanged is reused; one whose inputs changed
(model, data, sizes, seed, prompt format, refdir version, an upstream artifact) is recomputed.
The evaluation orthogonalizes weights: those of the run's own model (loaded here), or of a copy when
the caller passed a model it keeps using (``owns_model=False``, the default for a passed model).
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import time
from pathlib import Path

from refdir import __version__
from refdir.core.adapter import get_adapter
from refdir.core.errors import RefdirError
from refdir.core.io import write_json
from refdir.core.models import release_memory
from refdir.core.prompt_format import canonical_json_object
from refdir.core.runtime import BatchPolicy, Runtime
from refdir.core.templates import PromptFormat, format_prompt
from refdir.core.types import Model, Tokenizer
from refdir.evaluation.judges import second_judge
from refdir.evaluation.verdicts import check_judge_model, resolve_judge
from refdir.evaluation.xstest import attach_judge, summary_of
from refdir.method.directions import load_direction
from refdir.method.interventions import orthogonalize_weights
from refdir.run.folder import (
    RUN_FORMAT,
    RunFolder,
    StageLedger,
    check_run_folder,
    file_hash,
    read_meta,
    stage_key,
)
from refdir.run.settings import RunConfig
from refdir.run.stages import STAGES, Stage, StageContext


def _date_free(text: str) -> str:
    """The text with dates like "26 Jul 2024" / "2024-07-26" blanked: a prompt equal to it prints no date."""
    text = re.sub(r"\b\d{1,2} (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)[a-z]* \d{4}\b", "", text)
    return re.sub(r"\b\d{4}-\d{2}-\d{2}\b", "", text)


def base_key(rt: Runtime, cfg: RunConfig) -> dict:
    """What keys every stage: model, refdir version, dtype, quantization, revision, prompt format.

    The resolved dtype (auto -> float32 on the CPU keys like an explicit float32); placement does not
    change what a stage computes beyond float rounding, quantization and revision do.
    """
    load = rt.load_info
    key = {
        "model": rt.spec or cfg.model,
        "refdir": __version__,
        "dtype": load.get("dtype"),
        "system": cfg.system,
        "chat_template": cfg.chat_template,
    }
    key.update({k: load[k] for k in ("quantization", "revision") if load.get(k)})
    if cfg.template_kwargs:
        key["template_kwargs"] = cfg.template_kwargs
    # the rendered prompt itself: templates that print today's date must not mix two formats in one run
    rendered = format_prompt(rt.tokenizer, "x", cfg.fmt)
    if rendered != _date_free(rendered):
        key["rendered_prompt"] = rendered
    return key


def _stage_key(stage: Stage, folder: RunFolder, cfg: RunConfig, base: dict) -> str:
    files = {name: getattr(folder, name) for name in stage.inputs}
    hashes = {name: file_hash(f) if f.exists() else None for name, f in files.items()}
    return stage_key({**base, **stage.settings(cfg), **hashes})


def _runtime(cfg: RunConfig, model: Model | None, tok: Tokenizer | None, runtime: Runtime | None) -> Runtime:
    if runtime is None:
        if model is None:
            runtime = Runtime.load(cfg.model, cfg.fmt, cfg.batch_policy(), **cfg.load_options())
        else:
            if tok is None:
                raise RefdirError("run_pipeline: a model was passed without its tokenizer (tok=...)")
            runtime = Runtime(model, tok, cfg.fmt, cfg.batch_policy() or BatchPolicy())
    return runtime.with_format(cfg.fmt)


def _owner(rt: Runtime, owns_model: bool):
    """The model the run may edit: ``rt``'s own when the run owns it, else one copy made on first use."""
    made: list[Runtime] = []

    def owned() -> Runtime:
        if owns_model:
            return rt
        if not made:
            made.append(Runtime(copy.deepcopy(rt.model), rt.tokenizer, rt.fmt, rt.batch))
        return made[0]

    return owned


def write_config(folder: RunFolder, rt: Runtime, cfg: RunConfig) -> None:
    """``config.json``: resolved settings, how the model was loaded, batch policy, architecture."""
    write_json(
        folder.config,
        {
            "format": RUN_FORMAT,
            "refdir": __version__,
            **cfg.to_json(),
            "model_spec": rt.spec or cfg.model,
            "load": rt.load_info,
            "batch_policy": rt.batch.to_json(),
            "architecture": get_adapter(rt.model).describe(),
        },
    )


def _stopped(name: str, folder: RunFolder) -> dict:
    """What ``run_pipeline(stop_after=name)`` returns."""
    if name == "prompts":
        return json.loads(folder.prompts.read_text())
    if name == "extract":
        from refdir.core.io import load_tensors

        return {"candidates": list(load_tensors(folder.candidates)["directions"].shape)}
    return load_direction(folder.path).meta()


def run_pipeline(
    cfg: RunConfig,
    out: str | Path,
    model: Model | None = None,
    tok: Tokenizer | None = None,
    log=print,
    stop_after: str | None = None,
    must_reuse: tuple[str, ...] = (),
    runtime: Runtime | None = None,
    owns_model: bool | None = None,
) -> dict:
    """Run (or resume) every stage; returns the summary dict written to ``summary.json``.

    The stages share one :class:`~refdir.core.runtime.Runtime` (``runtime``, or built from ``model``/``tok``,
    or loaded from ``cfg``). The evaluation orthogonalizes the weights of a model the run owns: the one it
    loaded itself, or a passed one when ``owns_model=True``; otherwise it edits a copy. ``must_reuse``
    names stages that must already be complete with unchanged inputs (``refdir select`` uses it so that
    data paths read from a run folder's metadata are never followed).
    """
    t_start = time.time()
    check_run_folder(Path(out), cfg.model)
    resolve_judge(cfg.judge)  # an explicit probe judge that cannot run here: an error before the model loads
    check_judge_model(cfg.judge, cfg.judge_model)
    caps = CapabilityStage(cfg, log) if cfg.capabilities else None  # tasks and files checked before loading
    owns = (model is None and runtime is None) if owns_model is None else owns_model
    rt = _runtime(cfg, model, tok, runtime)
    get_adapter(rt.model)  # unsupported architecture: fail before writing anything
    format_prompt(rt.tokenizer, "x", cfg.fmt)  # no chat template: likewise
    folder = RunFolder(out)
    ledger = StageLedger(folder, on_done=release_memory)  # each stage's buffers given back before the next
    ctx = StageContext(cfg, rt, folder, log, _owner(rt, owns))
    base = base_key(rt, cfg)
    for stage in STAGES:
        if stage.name == "evaluate" and caps is not None:  # baseline half: before the weights are edited
            caps.baseline(ctx, ledger, base, must_reuse)
        key = _stage_key(stage, folder, cfg, base)
        artifacts = tuple(getattr(folder, a) for a in stage.artifacts)
        if not ledger.reuse(stage.name, key, artifacts, must_reuse, log):
            t = time.time()
            stage.run(ctx)
            ledger.done(stage.name, key, time.time() - t)
        if stage.name == "prompts":
            write_config(folder, rt, cfg)
        if stop_after == stage.name:
            return _stopped(stage.name, folder)
    if caps is not None:  # orthogonalized half, on the run's own (orthogonalized) model
        caps.finish(ctx, ledger)
    from refdir.outputs.report import write_report

    write_report(folder.path)
    summary = summarize(folder.path)
    summary["wall_seconds_this_invocation"] = round(time.time() - t_start, 1)
    write_json(folder.summary, summary)
    return summary


class CapabilityStage:
    """Capability benchmarks in two halves around the evaluation, which orthogonalizes the run's model: the
    baseline pass before it (``capabilities_baseline.json``), the orthogonalized pass after it, on the same
    items (``capabilities.json``). No second copy of the model when the run owns it; either half resumes."""

    def __init__(self, cfg: RunConfig, log):
        from refdir.evaluation.capabilities import plan_tasks

        assert cfg.capabilities, "only built for a run with capability tasks"
        self.log, self.key, self.done = log, "", False
        self._stack = contextlib.ExitStack()
        self.plan = self._stack.enter_context(
            plan_tasks(
                cfg.capabilities,
                cfg.capabilities_data_dir,
                cfg.capabilities_limit,
                cfg.capabilities_fewshot,
                cfg.capabilities_max_gen_toks,
            )
        )

    def baseline(self, ctx: StageContext, ledger: StageLedger, base: dict, must_reuse) -> None:
        from refdir.evaluation.capabilities import require_harness, run_condition, scores_to_json

        folder = ctx.folder
        self.key = stage_key(
            {
                "direction": file_hash(folder.direction),
                "tasks": self.plan.key(),
                "harness": require_harness().__version__,
                **base,
            }
        )
        self.done = ledger.reuse("capabilities", self.key, (folder.capabilities,), must_reuse, self.log)
        if self.done:
            return
        f = folder.capabilities_baseline
        if f.is_file() and json.loads(f.read_text()).get("key") == self.key:
            self.log("capabilities: baseline pass reused")
            return
        if ctx.orthogonalized:
            raise RefdirError(
                "the capability baseline needs the model's own weights, but they are orthogonalized"
            )
        self.log(f"capabilities: baseline pass ({', '.join(self.plan.names)})")
        t = time.time()
        scores = run_condition(ctx.rt, self.plan, self.log)
        write_json(
            f, {"key": self.key, "seconds": round(time.time() - t, 1), "scores": scores_to_json(scores)}
        )

    def finish(self, ctx: StageContext, ledger: StageLedger) -> None:
        from refdir.evaluation.capabilities import (
            harness_batches,
            result_json,
            run_condition,
            scores_from_json,
        )

        try:
            if self.done:
                return
            direction = load_direction(ctx.folder.path)
            owned = ctx.owned()
            if not ctx.orthogonalized:  # the evaluation was reused: edit the run's model now
                orthogonalize_weights(owned.model, direction.vector, allow_approximate=True)
                ctx.orthogonalized = True
            self.log("capabilities: orthogonalized pass on the same items")
            t = time.time()
            base = scores_from_json(json.loads(ctx.folder.capabilities_baseline.read_text())["scores"])
            treated = run_condition(owned, self.plan, self.log)
            res = result_json(owned.spec, direction, self.plan, base, treated, harness_batches(owned))
            write_json(ctx.folder.capabilities, res)
            ledger.done("capabilities", self.key, time.time() - t)
        finally:
            self._stack.close()


def judge_run(
    run_path: Path,
    judge_spec: str,
    model: Model | None,
    tok: Tokenizer | None,
    fmt: PromptFormat | None = None,
    only: list[str] | None = None,
    load_options: dict | None = None,
) -> dict:
    """Add (or replace) the second judge of a finished run from its stored completions: no regeneration.

    The chat judge reads its prompt in ``fmt`` (default: the run's own prompt format). Rewrites
    eval.json, the report and summary.json; returns the judge's results."""
    from refdir.core.io import read_jsonl
    from refdir.outputs.report import write_report

    folder = RunFolder(run_path)
    if not folder.eval.is_file() or not folder.completions.is_file():
        raise RefdirError(f"{run_path} has no evaluation yet: run `refdir run --out {run_path}` first")
    cfg = read_meta(folder.config)
    fmt = fmt or PromptFormat(
        system=cfg.get("system"),
        chat_template=cfg.get("chat_template"),
        template_kwargs=canonical_json_object(cfg.get("template_kwargs")),
    )
    ev = json.loads(folder.eval.read_text())
    ev["judge"] = second_judge(
        model, tok, read_jsonl(folder.completions), judge_spec, fmt, only, load_options
    )
    attach_judge(ev)  # the over-refusal block's second-judge rates follow the new judge
    write_json(folder.eval, ev)
    write_report(run_path)
    write_json(folder.summary, summarize(run_path))
    return ev["judge"]


def _capability_rows(caps: list[dict]) -> dict:
    def row(r: dict) -> dict:
        paired = {"lost": r["lost"], "gained": r["gained"], "mcnemar_p": round(r["mcnemar_p"], 4)}
        return {
            "n": r["n"],
            "baseline": round(r["baseline"], 4),
            "orthogonalized": round(r["orthogonalized"], 4),
            "delta": round(r["delta"], 4),
            "delta_ci95": [round(x, 4) for x in r["delta_ci95"]],
            **(paired if "mcnemar_p" in r else {}),
        }

    return {r["task"]: row(r) for r in caps}


def summarize(run_path: Path) -> dict:
    """The headline numbers of a finished run (printed as a table by the CLI)."""
    folder = RunFolder(run_path)
    ev = json.loads(folder.eval.read_text())
    caps = json.loads(folder.capabilities.read_text())["results"] if folder.capabilities.is_file() else []
    d, r, klce = ev["direction"], ev["refusal"], ev["kl_ce_harmless"]
    return {
        "model": json.loads(folder.config.read_text()).get("model_spec"),
        "layer": d["layer"],
        "pos": d["pos"],
        "norm": round(d["norm"], 3),
        "kl_selection": round(d["scores"].get("kl", float("nan")), 4),
        "harmful_refusal": {c: round(v["refusal_rate"], 3) for c, v in r["harmful"].items()},
        "harmless_refusal": {c: round(v["refusal_rate"], 3) for c, v in r["harmless"].items()},
        "ce_harmless": {c: round(v["ce"], 4) for c, v in klce.items()},
        "ce_harmless_text": {c: round(v["ce"], 4) for c, v in (ev.get("ce_harmless_text") or {}).items()},
        "kl_harmless_first": {c: round(v["kl_first"], 4) for c, v in klce.items()},
        "ortho_max_logit_diff": ev["ortho_check"]["max_abs_logit_diff_vs_ablation"],
        "judge_refusal": {
            k: round(v["refusal_rate"], 3)
            for k, v in ((ev.get("judge") or {}).get("conditions") or {}).items()
        },
        "capabilities": _capability_rows(caps),
        "overrefusal": summary_of(ev),  # XSTest: {set: {condition: {substring, judge, n}}}
    }
