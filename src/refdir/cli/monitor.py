"""``refdir monitor``: flag prompts by their projection onto r̂; the measurement is
:func:`refdir.analyses.monitor.monitor_folder`, this module parses its flags and prints its result."""

from __future__ import annotations

import argparse
from typing import Any

from refdir.cli.common import add_model_args, analysis_inputs, load_for_run
from refdir.run.folder import RunFolder
from refdir.run.settings import add_setting


def add_parser(sub: Any) -> None:
    mo = sub.add_parser(
        "monitor", help="flag prompts by their projection onto r̂; AUROC per layer and read position"
    )
    add_model_args(mo, from_run=True)
    mo.add_argument(
        "--run", required=True, help="run folder (its prompts, direction and suffix.json if present)"
    )
    mo.add_argument(
        "--prompts", default=None, help="prompts to score (builtin:harmful, a .json/.jsonl/.csv/.txt file)"
    )
    add_setting(mo, "prompt_field")
    mo.add_argument(
        "--out", required=True, help="output .json (also written to RUN/monitor.json for the report)"
    )
    mo.set_defaults(func=cmd_monitor)


def cmd_monitor(a: argparse.Namespace) -> int:
    from refdir.analyses.monitor import monitor_folder
    from refdir.outputs.report import write_report

    prompts, out = analysis_inputs(a)
    run = RunFolder(a.run)
    _, rt, direction = load_for_run(a, run)
    res = monitor_folder(run, rt, direction, prompts, out)
    write_report(run.path)
    e = res["evaluation"]["direction"]
    print(
        f"monitor at layer {res['layer']}, position {res['position']}: AUROC {e['auroc']:.3f}, TPR at 1% FPR "
        f"{e['tpr_at_1pct_fpr']:.2f} on "
        f"{res['n_evaluation']['harmful']}+{res['n_evaluation']['harmless']} eval "
        f"prompts; threshold {res['threshold']:.3f} -> {out}"
    )
    return 0
