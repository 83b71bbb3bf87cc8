"""``refdir overrefusal``: remove false refusals by ablating a second direction (Wang et al., ICLR 2025);
the measurement is :func:`refdir.analyses.overrefusal.measure_overrefusal`, this module parses its flags,
checks the run folder before the model loads, and prints its result. Also the export's ``--overrefusal``
source."""

from __future__ import annotations

import argparse
from typing import Any

from refdir.cli.common import add_model_args, load_for_run, positive_int
from refdir.core.errors import RefdirError
from refdir.run.folder import RunFolder


def add_parser(sub: Any) -> None:
    o = sub.add_parser(
        "overrefusal",
        help="find and ablate the false-refusal direction (Wang et al. 2025): fewer refusals of safe prompts",
    )
    add_model_args(o, from_run=True)
    o.add_argument("--run", required=True, help="run folder (its prompts, candidates and direction)")
    o.add_argument(
        "--pseudo-harmful",
        default="builtin:pseudo-harmful",
        help="safe prompts that sound unsafe: train the direction (default: builtin:pseudo-harmful)",
    )
    o.add_argument("--xstest", default="builtin:xstest-safe", help="safe prompts to test on")
    o.add_argument("--xstest-n", type=positive_int, default=50, help="XSTest prompts to evaluate (seeded)")
    o.add_argument("--judge", default=None, help="second judge spec (e.g. strmatch, self)")
    o.add_argument("--skip-eval", action="store_true", help="find and save the direction only")
    o.add_argument("--n-val", type=positive_int, default=24, help="pseudo-harmful prompts held out to score")
    o.add_argument("--layer-stride", type=positive_int, default=1, help="score every N-th layer only")
    o.add_argument("--kl-threshold", type=float, default=0.1, help="harmless first-token KL limit")
    o.add_argument(
        "--harmful-margin",
        type=float,
        default=1.0,
        help="the harmful validation refusal log-odds may drop by less than this",
    )
    o.set_defaults(func=cmd_overrefusal)


def cmd_overrefusal(a: argparse.Namespace) -> int:
    from refdir.analyses.overrefusal import OverrefusalSettings, check_inputs, measure_overrefusal
    from refdir.method.overrefusal import OverrefusalConfig
    from refdir.outputs.report import write_report

    run = RunFolder(a.run)
    settings = OverrefusalSettings(
        OverrefusalConfig(
            n_val=a.n_val,
            layer_stride=a.layer_stride,
            kl_threshold=a.kl_threshold,
            harmful_margin=a.harmful_margin,
        ),
        a.pseudo_harmful,
        a.xstest,
        a.xstest_n,
        a.judge,
        a.skip_eval,
    )
    check_inputs(run, settings)  # before the model loads: nothing is written on bad input
    _, rt, direction = load_for_run(a, run)
    res = measure_overrefusal(run, rt, direction, settings)
    write_report(run.path)
    d, kept = res["direction"], res["kept"]
    print(
        f"false-refusal direction: layer {d['layer']}, position {d['pos']} "
        f"(cos with r {d['cos_with_refusal_direction']:.1e}); kept {kept['n_kept']} of "
        f"{kept['n_scored']} pseudo-harmful prompts -> {run.overrefusal}"
    )
    ev = res["evaluation"]
    if ev:
        for split, conds in ev["refusal"].items():
            print(
                f"{split}: "
                + ", ".join(f"{c} {v['refusal_rate']:.2f} (n={v['n']})" for c, v in conds.items())
            )
    return 0


def export_source(a: argparse.Namespace) -> str:
    """``refdir export --run RUN --overrefusal``: the run's false-refusal direction file, checked."""
    if a.run is None:
        raise RefdirError("--overrefusal needs --run RUN (a run folder `refdir overrefusal` has written to)")
    if a.trial is not None or a.direction is not None or a.rank > 1:
        raise RefdirError(
            "--overrefusal exports the run's false-refusal direction: drop --trial/--direction/--rank"
        )
    f = RunFolder(a.run).overrefusal_direction
    if not f.is_file():
        raise RefdirError(f"{a.run} has no {f.name}: run `refdir overrefusal --run {a.run}` first")
    return str(f)
