"""``refdir export``: an orthogonalized checkpoint that plain transformers loads (streamed by default)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from refdir.cli.common import add_model_args, check_writable, load_options, log, positive_int
from refdir.core.errors import RefdirError


def add_parser(sub: Any) -> None:
    x = sub.add_parser("export", help="write an orthogonalized checkpoint loadable with plain transformers")
    add_model_args(x)
    x.add_argument("--direction", default=None, help="direction file or run folder (or --run with --trial)")
    x.add_argument("--run", default=None, help="run folder whose search trial --trial to export")
    x.add_argument(
        "--trial",
        type=int,
        default=None,
        help="export trial N of `refdir search --run RUN` (its weight edit; streamed unless --in-memory)",
    )
    x.add_argument("--out", required=True)
    x.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    x.add_argument(
        "--allow-approximate",
        action="store_true",
        help="edit projections even where writes pass through a norm (not equal to ablation)",
    )
    x.add_argument(
        "--rank",
        type=positive_int,
        default=1,
        help="project out the first RANK vectors of the run's refusal "
        "cone (refdir cone) instead of its direction alone",
    )
    x.add_argument(
        "--overrefusal",
        action="store_true",
        help="with --run: orthogonalize against the run's false-refusal direction (refdir overrefusal)",
    )
    x.add_argument(
        "--in-memory",
        action="store_true",
        help="load the model, edit it and save_pretrained (default: stream the source safetensors tensor "
        "by tensor, peak memory about one tensor)",
    )
    x.set_defaults(func=cmd_export)


def cmd_export(a: argparse.Namespace) -> int:
    from refdir.core.models import load_model
    from refdir.method.directions import load_direction
    from refdir.outputs.export import export_orthogonalized, export_streaming

    out = Path(a.out)
    if out.exists() and any(out.iterdir()) and not a.force:
        raise RefdirError(f"output folder {out} is not empty; pass --force to replace it")
    check_writable(out)
    if a.overrefusal:
        from refdir.cli.overrefusal import export_source

        a.direction = export_source(a)
    if a.trial is not None:
        return _export_trial(a, out)
    if a.direction is None:
        raise RefdirError("give --direction (a direction file or run folder), or --run RUN --trial N")
    load_direction(a.direction)  # validate before loading the model
    if a.rank > 1:
        from refdir.method.directions import load_subspace

        load_subspace(a.direction, a.rank)
    if a.in_memory:
        if a.load_in_4bit or a.load_in_8bit:
            raise RefdirError(
                "--in-memory cannot edit quantized weights; drop it: the default streaming export "
                "re-reads the full-precision source"
            )
        model, tok = load_model(a.model, **load_options(a))
        path = export_orthogonalized(
            model, tok, a.direction, out, allow_approximate=a.allow_approximate, rank=a.rank
        )
    else:  # quantization and placement flags do not matter: the source tensors are read from disk
        path = export_streaming(
            a.model,
            None,
            a.direction,
            out,
            allow_approximate=a.allow_approximate,
            revision=a.revision,
            trust_remote_code=a.trust_remote_code,
            log=log,
            rank=a.rank,
        )
    print(f"exported orthogonalized checkpoint to {path}")
    return 0


def _export_trial(a: argparse.Namespace, out: Path) -> int:
    """A search trial's edit: streamed from the source checkpoint (default) or written into the loaded
    model's weights and saved (``--in-memory``)."""
    from refdir.outputs.edit_export import export_edit, export_edit_streaming
    from refdir.run.search import read_trials, trial_edit

    if a.run is None:
        raise RefdirError("--trial needs --run RUN (the run folder refdir search wrote front.json into)")
    edit = trial_edit(a.run, a.trial)  # validates before the model loads
    row = next(t for t in read_trials(Path(a.run) / "search_trials.jsonl") if t["number"] == a.trial)
    meta = {"run": str(a.run), "trial": a.trial, "params": row["params"], "proxy": row["proxy"]}
    if a.in_memory:
        from refdir.core.models import load_model

        if a.load_in_4bit or a.load_in_8bit:
            raise RefdirError("--in-memory cannot edit quantized weights; drop it to stream the source")
        model, tok = load_model(a.model, **load_options(a))
        path = export_edit(model, tok, edit, out, meta, allow_approximate=a.allow_approximate)
    else:
        path = export_edit_streaming(
            a.model,
            edit,
            out,
            meta,
            allow_approximate=a.allow_approximate,
            revision=a.revision,
            trust_remote_code=a.trust_remote_code,
            log=log,
        )
    print(f"exported search trial {a.trial} of {a.run} to {path}")
    return 0
