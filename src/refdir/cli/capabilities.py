"""``refdir capabilities``: capability benchmarks (lm-eval), baseline vs orthogonalized, paired deltas.

Its flags are the settings schema's ``capabilities*`` settings (those of ``refdir run --capabilities``)
under this command's shorter names, so both check a value the same way.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from refdir.cli.common import add_model_args, check_direction_fits, check_writable, load_options, log
from refdir.run.settings import add_setting


def add_parser(sub: Any) -> None:
    cp = sub.add_parser(
        "capabilities",
        help="capability benchmarks (lm-eval): baseline vs orthogonalized, paired deltas with 95%% intervals",
    )
    add_model_args(cp)
    cp.add_argument(
        "--direction",
        default=None,
        help="run folder or direction file (omit to evaluate the model alone, e.g. an exported checkpoint)",
    )
    add_setting(
        cp,
        "capabilities",
        "--tasks",
        required=True,
        help="harness task names, comma-separated, or 'paper' "
        "(mmlu,arc_challenge,gsm8k,truthfulqa_mc2,winogrande,hellaswag)",
    )
    add_setting(
        cp,
        "capabilities_data_dir",
        "--data-dir",
        help="local copies of the paper's benchmarks in their original "
        "formats (the layout of shared/benchmarks/); default: the harness's hub datasets",
    )
    add_setting(cp, "capabilities_limit", "--limit", help="items per task (MMLU: over its subjects)")
    add_setting(cp, "capabilities_fewshot", "--num-fewshot", help="default: each task's own")
    add_setting(cp, "capabilities_max_gen_toks", "--max-gen-toks", help="cap of generative tasks (GSM8K)")
    add_setting(cp, "batch_size", help="rows per forward pass")
    cp.add_argument("--out", required=True, help="output .json")
    cp.set_defaults(func=cmd_capabilities)


def cmd_capabilities(a: argparse.Namespace) -> int:
    """Everything that can fail is checked before the model loads; the output is written once, at the end."""
    from refdir.core.io import write_json
    from refdir.core.runtime import BatchPolicy, Runtime
    from refdir.evaluation.capabilities import evaluate_capabilities, plan_tasks, print_table
    from refdir.method.directions import load_direction

    out = Path(a.out)
    check_writable(out)
    direction = load_direction(a.direction) if a.direction else None  # read once, before any model loads
    with plan_tasks(a.tasks, a.data_dir, a.limit, a.num_fewshot, a.max_gen_toks) as plan:
        batch = BatchPolicy(prompt_rows=a.batch_size, source="user") if a.batch_size else None
        rt = Runtime.load(a.model, batch=batch, **load_options(a))
        if direction is not None:
            check_direction_fits(direction, a.direction, rt.adapter.d_model, rt.spec)
        res = evaluate_capabilities(rt, direction, plan, log=log)
    write_json(out, res)
    print_table(res)
    print(f"capabilities written to {out}")
    return 0
