"""``refdir judge``: a second judge on a finished run's stored completions (nothing regenerated), or any
judge on a completions file (``--completions``: XSTest's labelled CSV, JSON lines) with its agreement
with the file's human labels."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Any

from refdir.cli.common import (
    add_model_args,
    check_writable,
    load_options,
    print_summary,
    prompt_format,
    run_model_and_format,
)
from refdir.core.errors import RefdirError
from refdir.run.folder import RunFolder
from refdir.run.settings import RunConfig, add_setting


def add_parser(sub: Any) -> None:
    j = sub.add_parser(
        "judge",
        help="label a finished run's completions with a second judge (no regeneration), or judge a "
        "completions file",
    )
    add_model_args(j, from_run=True)
    src = j.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a finished run folder: writes the judge into its eval.json")
    src.add_argument(
        "--completions",
        metavar="FILE",
        help="a .csv or .jsonl file with prompt and completion fields (e.g. XSTest's labelled CSV; "
        "a final_label column adds the agreement with the human labels); needs --out",
    )
    add_setting(
        j,
        "judge",
        default=None,
        help="'probe[:PATH]' (a linear probe on a small judge model; the default when it can run "
        "here), 'self' (the model says whether each reply is a refusal; --run's default otherwise), "
        "'self+evasive' (and whether each other reply evades the request: for strong judge models), "
        "'substring' (the paper's phrases; --completions' default otherwise), 'strmatch' (XSTest's "
        "prefixes), 'http://HOST/v1' (an OpenAI-compatible server; needs --judge-model) or a safety "
        "classifier hub id/folder",
    )
    j.add_argument(
        "--judge-model", metavar="NAME", help="the model an endpoint judge asks (--judge http://...)"
    )
    j.add_argument("--out", metavar="FILE", help="the verdict file of --completions (JSON)")
    j.add_argument(
        "--conditions",
        nargs="+",
        default=None,
        metavar="SPLIT/CONDITION",
        help="judge only these (e.g. harmless/actadd+ harmful/ablation); default: all",
    )
    j.set_defaults(func=cmd_judge)


def default_judge(fallback: str) -> str:
    """The judge without ``--judge``: the run setting's default ("auto": the probe judge when it can run
    here), else ``fallback`` ('self' for a run, whose model is at hand; 'substring' for a file)."""
    from refdir.evaluation.verdicts import resolve_judge

    default = next(f.default for f in fields(RunConfig) if f.name == "judge")
    spec = resolve_judge(default)[0] if isinstance(default, str) else None
    return spec or fallback


def chosen_judge(a: argparse.Namespace, fallback: str) -> str:
    """``--judge`` as given (an explicit probe that cannot run here fails now), else the default."""
    from refdir.evaluation.verdicts import resolve_judge

    if a.judge in (None, "auto"):
        return default_judge(fallback)
    if a.judge == "none":
        raise RefdirError("--judge none names no judge: give one, or leave --judge out for the default")
    resolve_judge(a.judge)
    return str(a.judge)


def cmd_judge(a: argparse.Namespace) -> int:
    """Second judge on a finished run (reads completions.jsonl, rewrites eval.json, summary and report),
    or a judge on a completions file."""
    if a.completions is not None:
        return judge_completions(a)
    from refdir.core.io import read_jsonl
    from refdir.evaluation.verdicts import is_endpoint, needs_model
    from refdir.run.pipeline import judge_run, summarize

    if a.out is not None or a.judge_model is not None or (a.judge and is_endpoint(a.judge)):
        raise RefdirError(
            "--out, --judge-model and endpoint judges (http://...) work with --completions only"
        )
    spec = chosen_judge(a, "self")
    run = RunFolder(a.run)
    if not run.completions.is_file() or not run.eval.is_file():
        raise RefdirError(f"{run.path} has no evaluation yet: run `refdir run --out {run.path}` first")
    have = {f"{r.get('split')}/{r.get('condition')}" for r in read_jsonl(run.completions)}
    missing = sorted(set(a.conditions or []) - have)
    if missing:  # before loading any model
        raise RefdirError(
            f"no completions for {', '.join(missing)} in {run.path}; it has {', '.join(sorted(have))}"
        )
    model_spec, fmt = run_model_and_format(a, run)
    opts = load_options(a)
    model = tok = None
    if needs_model(spec):  # other judges load their own model, or need none
        from refdir.core.models import load_model

        model, tok = load_model(model_spec, **opts)
    judge_opts = {k: opts[k] for k in ("device", "dtype", "trust_remote_code")}
    judge_run(run.path, spec, model, tok, fmt, a.conditions, judge_opts)
    print_summary(summarize(run.path))
    return 0


def check_completions_args(a: argparse.Namespace, spec: str) -> Path:
    """Everything about ``--completions``' flags that can be wrong, before any file or model is read."""
    from refdir.evaluation.verdicts import check_judge_model, needs_model

    if a.out is None:
        raise RefdirError("--completions needs --out FILE (the verdict file)")
    if a.conditions is not None:
        raise RefdirError("--conditions works with --run only")
    check_judge_model(spec, a.judge_model)
    if needs_model(spec) and not a.model:
        raise RefdirError(f"--judge {spec} on --completions needs --model (the model that judges)")
    return Path(a.out)


def human_labels(rows: list[dict[str, Any]], path: str) -> list[str] | None:
    """The rows' XSTest ``final_label`` values, checked, if the file has them (every row or none)."""
    from refdir.evaluation.judge_metrics import human_label

    given = [r.get("final_label") not in (None, "") for r in rows]
    if not any(given):
        return None
    for n, (r, g) in enumerate(zip(rows, given), 1):
        if not g:
            raise RefdirError(
                f"{path}: item {n} has no final_label but others have; label it or drop the column"
            )
        try:
            human_label(r["final_label"])
        except RefdirError as e:
            raise RefdirError(f"{path}: item {n}: {e}") from None
    return [str(r["final_label"]) for r in rows]


def human_agreement(verdicts: list, final: list[str]) -> dict[str, Any]:
    """Agreement with the human labels: refusal vs not, by human class, and three-way when the judge
    gives XSTest's classes."""
    from refdir.evaluation.judge_metrics import (
        agreement,
        human_refusal,
        partial_breakdown,
        three_way_agreement,
    )
    from refdir.evaluation.verdicts import LABELS

    pred = [v.refusal for v in verdicts]
    out: dict[str, Any] = {
        "binary": agreement(pred, [human_refusal(f) for f in final]),
        "by_human_label": partial_breakdown(pred, final),
    }
    labels = [v.label for v in verdicts]
    if any(lab is not None for lab in labels) and all(lab in (*LABELS, None) for lab in labels):
        out["three_way"] = three_way_agreement(labels, final)
    return out


def judge_completions(a: argparse.Namespace) -> int:
    """``--completions``: every input checked before a model loads; the verdict file written last."""
    from refdir.evaluation.judge_files import check_out_path, read_completions, write_judged
    from refdir.evaluation.verdicts import is_probe, make_judge, needs_model

    spec = chosen_judge(a, "substring")
    out = check_completions_args(a, spec)
    rows = read_completions(a.completions)
    check_out_path(out, a.completions)
    check_writable(out)
    final = human_labels(rows, a.completions)
    opts = load_options(a)
    model = tok = None
    if needs_model(spec) or (is_probe(spec) and a.model):  # a probe reuses --model if it is its judge model
        from refdir.core.models import load_model

        model, tok = load_model(a.model, **opts)
    judge_opts = {k: opts[k] for k in ("device", "dtype", "trust_remote_code")}
    judge = make_judge(spec, model, tok, prompt_format(a), judge_model=a.judge_model, load_options=judge_opts)
    verdicts = judge.verdicts([r["prompt"] for r in rows], [r["completion"] for r in rows])
    extra: dict[str, Any] = {"kind": judge.name}
    if a.judge_model:
        extra["judge_model"] = a.judge_model
    unparsed = getattr(judge, "unparsed", None)
    if unparsed is not None:
        extra["unparsed"] = unparsed
    if final is not None:
        extra["human_agreement"] = human_agreement(verdicts, final)
    doc = write_judged(out, rows, verdicts, spec, source=a.completions, extra=extra)
    print(summary_line(doc))
    return 0


def summary_line(doc: dict[str, Any]) -> str:
    """One line: the judge, the refusal rate and, with human labels, accuracy and kappa."""
    line = f"judge {doc['judge']}: {doc['n']} completions, refusal rate {doc['refusal_rate']:.3f}"
    agr = (doc.get("human_agreement") or {}).get("binary")
    if agr:
        kappa = "-" if agr["kappa"] is None else f"{agr['kappa']:.3f}"
        line += f"; vs human labels: accuracy {agr['accuracy']:.3f}, kappa {kappa}"
    if doc.get("unparsed"):
        line += f"; {len(doc['unparsed'])} replies named no class (counted as compliance)"
    return line
