"""``refdir jailbreaks``: the paper's Table 2 on a finished run (direct request, random / GCG suffix,
-r, orthogonalized weights), refusal and compliance by every judge."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from refdir.cli.common import add_model_args, check_writable, load_for_run, load_options, log, rate
from refdir.core.errors import RefdirError
from refdir.run.folder import RunFolder
from refdir.run.settings import add_setting


def add_parser(sub: Any) -> None:
    jb = sub.add_parser(
        "jailbreaks",
        help="paper Table 2: refusal and judge-scored compliance under direct request, "
        "random / GCG suffix, -r and orthogonalized weights",
    )
    add_model_args(jb, from_run=True)
    jb.add_argument("--run", required=True, help="a finished run folder (suffix.json adds the GCG row)")
    add_setting(jb, "judge", default=None, help="second judge (default: the run's own, if it has one)")
    jb.add_argument("--out", default=None, help="output .json (default: RUN/jailbreaks.json)")
    jb.set_defaults(func=cmd_jailbreaks)


def cmd_jailbreaks(a: argparse.Namespace) -> int:
    from refdir.core.io import write_json, write_jsonl
    from refdir.evaluation.jailbreaks import jailbreak_table
    from refdir.outputs.report import write_report

    run = RunFolder(a.run)
    out = Path(a.out) if a.out else run.jailbreaks
    check_writable(out)
    if not run.eval.is_file():
        raise RefdirError(f"{run.path} has no evaluation yet: run `refdir run --out {run.path}` first")
    data, rt, _ = load_for_run(a, run)
    opts = {k: load_options(a)[k] for k in ("device", "dtype", "trust_remote_code")}
    res, rows = jailbreak_table(rt, run.path, data, a.judge, opts, log=log)
    write_jsonl(run.jailbreak_completions, rows)
    write_json(out, res)
    if out.resolve() != run.jailbreaks.resolve():
        write_json(run.jailbreaks, res)
    write_report(run.path)
    _print_table(res)
    print(f"jailbreak table written to {out}")
    return 0


def _print_table(res: dict) -> None:
    judges = res["judges"]
    print(
        f"{'condition':26} {'n':>4} "
        + " ".join(f"{'refusal ' + j[:12]:>22} {'compliance':>10}" for j in judges)
    )
    for r in res["rows"]:
        cells = " ".join(
            f"{rate(r['refusal'].get(j)):>22} {rate(r['compliance'].get(j)):>10}" for j in judges
        )
        print(f"{r['condition']:26} {r['n']:>4} {cells}")
