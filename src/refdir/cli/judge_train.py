"""``refdir judge-train``: fit the probe judge on labeled completions (XSTest's labelled CSVs, or any
.csv / .jsonl with a ``label`` field), so that ``--judge probe:PATH`` judges with it.

The shipped probe was trained on one judge model and one set of labels; a user with other models'
completions, or other labelling conventions, refits it here. Every input is checked before the judge
model loads; the probe file is written last, atomically.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from refdir.cli.common import check_writable, log, positive_int
from refdir.core.errors import RefdirError
from refdir.run.settings import add_setting

DEFAULT_JUDGE_MODEL = "qwen2.5-coder-0.5b-instruct"  # the shipped probe's judge model


def add_parser(sub: Any) -> None:
    t = sub.add_parser(
        "judge-train",
        help="train the probe judge on labeled completions (then: --judge probe:PATH)",
    )
    t.add_argument(
        "--labeled",
        nargs="+",
        required=True,
        metavar="FILE",
        help=".csv or .jsonl files with prompt, completion and a final_label (XSTest's) or label "
        "(compliance | refusal | partial) on every row",
    )
    t.add_argument("--out", required=True, metavar="PROBE.safetensors", help="the probe file to write")
    t.add_argument(
        "--judge-model",
        default=DEFAULT_JUDGE_MODEL,
        metavar="SPEC",
        help=f"the model whose residual stream the probe reads (default: {DEFAULT_JUDGE_MODEL})",
    )
    t.add_argument(
        "--layer", type=int, default=None, help="default: the shipped probe's layer, else the middle one"
    )
    t.add_argument("--chars", type=positive_int, default=400, help="the reply's first characters read")
    t.add_argument("--l2", type=nonnegative, default=1e-2, help="L2 regularization of the weights")
    add_setting(t, "device")  # the judge model's placement (the probe judge loads it with these too)
    add_setting(t, "dtype")
    t.set_defaults(func=cmd_judge_train)


def nonnegative(v: str) -> float:
    """argparse ``type=`` of --l2."""
    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{v}'") from None
    if not x >= 0:  # NaN too
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {v}")
    return x


def cmd_judge_train(a: argparse.Namespace) -> int:
    """Check the files and the output, then train on the judge model and write the probe."""
    from refdir.evaluation.judge_files import check_out_path
    from refdir.evaluation.probe_judge import read_labeled, train_on_judge_model

    out = Path(a.out)
    for f in a.labeled:
        check_out_path(out, f)
    if out.is_dir():
        raise RefdirError(f"--out {out} is a folder; give the probe file's name")
    if a.layer is not None and a.layer < 0:
        raise RefdirError(f"--layer must be 0 or more, got {a.layer}")
    check_writable(out)
    prompts, completions, labels = read_labeled(a.labeled)
    log(f"judge-train: {len(labels)} labeled completions on {a.judge_model}")
    probe = train_on_judge_model(
        a.judge_model,
        prompts,
        completions,
        labels,
        layer=a.layer,
        chars=a.chars,
        l2=a.l2,
        load_options={"device": a.device, "dtype": a.dtype},
        info={"files": [Path(f).name for f in a.labeled]},
    )
    probe.save(out)
    acc = probe.info["train_accuracy"]
    print(f"probe judge written to {out}: layer {probe.layer}, training accuracy {acc:.3f} on {len(labels)}")
    return 0
