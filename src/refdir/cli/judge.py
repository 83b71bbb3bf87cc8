"""``refdir judge``: a second judge on a finished run's stored completions (nothing regenerated)."""

from __future__ import annotations

import argparse
from typing import Any

from refdir.cli.common import add_model_args, load_options, print_summary, run_model_and_format
from refdir.core.errors import RefdirError
from refdir.run.folder import RunFolder
from refdir.run.settings import add_setting


def add_parser(sub: Any) -> None:
    j = sub.add_parser(
        "judge", help="label a finished run's completions with a second judge (no regeneration)"
    )
    add_model_args(j, from_run=True)
    j.add_argument("--run", required=True)
    add_setting(
        j,
        "judge",
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
    j.set_defaults(func=cmd_judge)


def cmd_judge(a: argparse.Namespace) -> int:
    """Second judge on a finished run: reads completions.jsonl, rewrites eval.json, summary and report."""
    from refdir.core.io import read_jsonl
    from refdir.core.models import load_model
    from refdir.run.pipeline import judge_run, summarize

    run = RunFolder(a.run)
    if not run.completions.is_file() or not run.eval.is_file():
        raise RefdirError(f"{run.path} has no evaluation yet: run `refdir run --out {run.path}` first")
    have = {f"{r.get('split')}/{r.get('condition')}" for r in read_jsonl(run.completions)}
    missing = sorted(set(a.conditions or []) - have)
    if missing:  # before loading any model
        raise RefdirError(
            f"no completions for {', '.join(missing)} in {run.path}; it has {', '.join(sorted(have))}"
        )
    spec, fmt = run_model_and_format(a, run)
    opts = load_options(a)
    model, tok = load_model(spec, **opts)
    judge_opts = {k: opts[k] for k in ("device", "dtype", "trust_remote_code")}
    judge_run(run.path, a.judge, model, tok, fmt, a.conditions, judge_opts)
    print_summary(summarize(run.path))
    return 0
