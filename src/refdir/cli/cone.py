"""``refdir cone``: ablate refusal subspaces of rank 1..K (Wollschläger et al. 2025); the measurement is
:func:`refdir.analyses.cone.measure_cone`, this module parses its flags and prints its table."""

from __future__ import annotations

import argparse
from typing import Any

from refdir.cli.common import add_model_args, analysis_inputs, load_for_run, positive_int
from refdir.run.folder import RunFolder
from refdir.run.settings import add_setting


def add_parser(sub: Any) -> None:
    co = sub.add_parser("cone", help="ablate refusal subspaces of rank 1..K (Wollschläger et al. 2025)")
    add_model_args(co, from_run=True)
    co.add_argument("--run", required=True, help="run folder (its prompts, candidates and direction)")
    co.add_argument(
        "--prompts", default=None, help="harmful prompts to evaluate (default: the run's eval_harmful)"
    )
    add_setting(co, "prompt_field")
    co.add_argument("--max-rank", type=positive_int, default=4)
    add_setting(co, "max_new_tokens", default=64, help="greedy tokens per completion")
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
    co.set_defaults(func=cmd_cone)


def cmd_cone(a: argparse.Namespace) -> int:
    from refdir.analyses.cone import ConeSettings, measure_cone
    from refdir.outputs.report import write_report

    harmful, out = analysis_inputs(a)
    run = RunFolder(a.run)
    _, rt, direction = load_for_run(a, run)
    settings = ConeSettings(
        max_rank=a.max_rank,
        max_new_tokens=a.max_new_tokens,
        refine=a.refine,
        refine_time_budget=a.refine_time_budget,
        refine_steps=a.refine_steps,
        kl_budget=a.kl_budget,
    )
    res = measure_cone(run, rt, direction, settings, harmful, out)
    write_report(run.path)
    rows = res["ranks"]
    print(
        "cone: "
        + ", ".join(f"rank {r['rank']} refusal {r['refusal_rate']:.2f} (KL {r['kl']:.3f})" for r in rows)
        + f" on {rows[0]['n']} prompts -> {out}"
    )
    return 0
