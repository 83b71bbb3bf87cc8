"""``refdir run | extract | select``: the pipeline, whole or its first stages, on one run folder.

Every flag of ``run`` and ``extract`` comes from the settings schema (:mod:`refdir.run.settings`), so a
flag and the same key in a ``--config`` file are checked alike; everything is validated before the model
loads.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from refdir.cli.common import check_writable, log, print_summary
from refdir.core.errors import RefdirError
from refdir.run.folder import RunFolder, check_run_folder
from refdir.run.settings import PRESETS, RunConfig, add_arguments

# attributes of a parsed ``run`` command that are not settings
NOT_SETTINGS = {"cmd", "debug", "config", "out", "preset", "stop_after", "func"}


def add_run_args(r: argparse.ArgumentParser) -> None:
    """Every setting of the config schema; a flag not given leaves the preset's / the TOML file's value."""
    r.add_argument("--config", default=None, metavar="RUN.toml", help="settings file (flags override it)")
    r.add_argument("--out", default=None, help="run folder (default: runs/<model>-seed<seed>)")
    r.add_argument("--preset", default=None, choices=list(PRESETS), help="default | quick | paper")
    add_arguments(r, ("model", "load", "run", "selection"))


def add_parser(sub: Any) -> None:
    r = sub.add_parser("run", help="extract -> select -> evaluate -> report")
    add_run_args(r)
    r.add_argument("--stop-after", choices=["prompts", "extract", "select"], default=None)
    r.set_defaults(func=cmd_run)
    x = sub.add_parser("extract", help="prompts and candidate directions only (stage 1-2 of run)")
    add_run_args(x)
    x.set_defaults(stop_after="extract", func=cmd_run)
    sl = sub.add_parser("select", help="select the direction in a run folder made by `extract` (stage 3)")
    sl.add_argument("--out", required=True, help="the run folder")
    add_arguments(sl, ("selection",))
    sl.set_defaults(stop_after="select", func=cmd_select)


def cmd_run(a: argparse.Namespace) -> int:
    from refdir.method.screen import validate_inputs
    from refdir.run.pipeline import run_pipeline
    from refdir.run.settings import resolve

    cfg = resolve({k: v for k, v in vars(a).items() if k not in NOT_SETTINGS}, a.config, a.preset)
    validate_inputs(cfg)  # data sources and sizes, before loading the model
    out = Path(a.out or f"runs/{Path(cfg.model).name}-seed{cfg.seed}")
    check_writable(out)
    t = time.time()
    summary = run_pipeline(cfg, out, stop_after=a.stop_after, log=log)
    if a.stop_after:
        print(json.dumps(summary, indent=1)[:2000])
        return 0
    print_summary(summary)
    print(f"run folder: {out}  (report: {RunFolder(out).report}; {time.time() - t:.0f} s)")
    return 0


def cmd_select(a: argparse.Namespace) -> int:
    """Rebuild the run's configuration from its config.json, then run up to selection (earlier stages
    reused)."""
    from refdir.run.pipeline import run_pipeline

    out = Path(a.out)
    folder = RunFolder(out)
    if not folder.config.is_file():
        raise RefdirError(f"{out} has no config.json: create it with `refdir extract --out {out}` first")
    try:
        old = json.loads(folder.config.read_text())
    except json.JSONDecodeError:
        raise RefdirError(f"{folder.config} is corrupt; rerun `refdir extract`") from None
    check_run_folder(out, old.get("model", ""))
    names = set(RunConfig.__dataclass_fields__) - {"selection"}  # config.json also holds provenance keys
    cfg = RunConfig(**{k: v for k, v in old.items() if k in names})
    for k, v in vars(a).items():  # the selection flags given (the others keep the schema's defaults)
        if k.startswith("selection."):
            setattr(cfg.selection, k.split(".", 1)[1], v)
    d = run_pipeline(
        cfg, out, stop_after="select", log=log, must_reuse=("prompts", "extract")
    )  # never follow data paths from the folder's metadata
    print(
        f"chosen direction: layer {d['layer']}, position {d['position']} ({d.get('token')!r}); bypass "
        f"{d.get('bypass', float('nan')):.3f}, induce {d.get('induce', float('nan')):.3f}, "
        f"KL {d.get('kl', float('nan')):.4f}"
        f" -> {folder.direction}"
    )
    return 0
