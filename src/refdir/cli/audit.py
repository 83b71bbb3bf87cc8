"""``refdir audit``: one page on how brittle a model's refusal is. On a finished run it measures what is
missing (the refusal cone, the monitor) with the analyses' library calls on one loaded model; with
``--model`` and no finished run, it makes the run first (the stated ``--preset``)."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Any

from refdir.cli.common import add_model_args, check_writable, load_for_run, log, positive_int
from refdir.core.errors import RefdirError
from refdir.run.folder import RunFolder
from refdir.run.settings import RunConfig


def add_parser(sub: Any) -> None:
    au = sub.add_parser(
        "audit", help="one page on how brittle the model's refusal is (audit.html + audit.json)"
    )
    add_model_args(au, from_run=True)
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
    au.set_defaults(func=cmd_audit)


def cmd_audit(a: argparse.Namespace) -> int:
    """Audit a finished run, or run what is missing first (the run with --preset, the cone, the monitor)."""
    from refdir.outputs.audit import write_audit

    out = Path(a.out)
    check_writable(out)
    if a.run is None and a.model is None:
        raise RefdirError("pass --run RUN (a finished run) or --model M (refdir runs what is missing)")
    run = RunFolder(a.run if a.run else out / "run")
    if not run.eval.is_file():
        if a.model is None:
            raise RefdirError(
                f"{run.path} has no evaluation yet: run `refdir run --out {run.path}` first or pass --model"
            )
        _make_run(a, run)
    _measure_missing(a, run)
    page = write_audit(run.path, out)
    print(f"audit written to {page} and {out / 'audit.json'}")
    return 0


def _make_run(a: argparse.Namespace, run: RunFolder) -> None:
    """The whole run on ``--model`` with the model and load flags given and the stated preset."""
    from refdir.run.pipeline import run_pipeline
    from refdir.run.settings import resolve

    given = {
        f.name: getattr(a, f.name)
        for f in fields(RunConfig)  # the model and load flags, from the schema
        if f.metadata.get("group") in ("model", "load")
    }
    run_pipeline(resolve(given, None, a.preset), run.path, log=log)


def _measure_missing(a: argparse.Namespace, run: RunFolder) -> None:
    """The refusal cone (ranks 1..--max-rank, the run's prompts) and the monitor, where the run lacks
    them, on one loaded model; then the run's report shows them."""
    if run.cone.is_file() and run.monitor.is_file():
        return
    from refdir.analyses.cone import ConeSettings, measure_cone
    from refdir.analyses.monitor import monitor_folder
    from refdir.outputs.report import write_report

    _, rt, direction = load_for_run(a, run)
    if not run.cone.is_file():
        measure_cone(run, rt, direction, ConeSettings(max_rank=a.max_rank, max_new_tokens=64))
    if not run.monitor.is_file():
        monitor_folder(run, rt, direction, out=run.monitor_items)
    write_report(run.path)
