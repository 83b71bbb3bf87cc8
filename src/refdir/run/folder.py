"""The run folder's contract: every file a run, an analysis or a report reads or writes, named once.

``RunFolder(path)`` is a plain value (no side effects): readers (report, audit, jailbreaks, judge,
cone, monitor, the CLI) take their paths from it. ``StageLedger`` is the writer's side: ``stages.json``
with each stage's input hash, so a stage whose inputs are unchanged is reused after a kill.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from refdir import __version__
from refdir.core.errors import RefdirError

RUN_FORMAT = 1


@dataclass(frozen=True)
class RunFolder:
    """Paths of a run folder's artifacts, in the order the stages write them."""

    path: Path

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))

    def file(self, name: str) -> Path:
        return self.path / name

    # run settings and the stage ledger
    config = property(lambda self: self.path / "config.json")
    batch_policy = property(lambda self: self.path / "batch_policy.json")
    stages = property(lambda self: self.path / "stages.json")
    # stages, in order
    prompts = property(lambda self: self.path / "prompts.json")
    screen_means = property(lambda self: self.path / "screen_means.safetensors")
    candidates = property(lambda self: self.path / "candidates.safetensors")
    candidates_meta = property(lambda self: self.path / "candidates.json")
    selection = property(lambda self: self.path / "selection.json")
    direction = property(lambda self: self.path / "direction.safetensors")
    direction_meta = property(lambda self: self.path / "direction.json")
    eval = property(lambda self: self.path / "eval.json")
    completions = property(lambda self: self.path / "completions.jsonl")
    capabilities = property(lambda self: self.path / "capabilities.json")
    capabilities_baseline = property(lambda self: self.path / "capabilities_baseline.json")
    summary = property(lambda self: self.path / "summary.json")
    report = property(lambda self: self.path / "report.html")
    heatmaps = property(lambda self: self.path / "heatmaps.png")
    refusal_rates = property(lambda self: self.path / "refusal_rates.png")
    # analyses on a finished run
    suffix = property(lambda self: self.path / "suffix.json")
    suffix_analysis = property(lambda self: self.path / "suffix_analysis.json")
    jailbreaks = property(lambda self: self.path / "jailbreaks.json")
    jailbreak_completions = property(lambda self: self.path / "jailbreak_completions.jsonl")
    cone = property(lambda self: self.path / "cone.json")
    cone_basis = property(lambda self: self.path / "cone.safetensors")
    monitor = property(lambda self: self.path / "monitor.json")
    monitor_items = property(lambda self: self.path / "monitor_items.json")
    # refdir overrefusal: the false-refusal direction (Wang et al. 2025), its selection and evaluation
    overrefusal = property(lambda self: self.path / "overrefusal.json")
    overrefusal_direction = property(lambda self: self.path / "overrefusal_direction.safetensors")
    overrefusal_completions = property(lambda self: self.path / "overrefusal_completions.jsonl")
    # refdir search: one line per finished trial (resume), and every trial with both fronts
    search_trials = property(lambda self: self.path / "search_trials.jsonl")
    front = property(lambda self: self.path / "front.json")

    def read_meta(self, name: str) -> dict:
        """One of the folder's JSON files, checked by :func:`read_meta`."""
        return read_meta(self.path / name)


def read_meta(path: Path) -> dict:
    """A run-folder metadata file: a JSON object of a format this refdir can read, or one clear error."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RefdirError(f"{path} is corrupt; delete the run folder or choose another --out") from None
    if not isinstance(data, dict):
        raise RefdirError(f"{path} is not refdir run metadata; choose another --out")
    fmt = data.get("format", 1)
    if not isinstance(fmt, int) or isinstance(fmt, bool):
        raise RefdirError(
            f"{path} has an invalid format field; delete the run folder or choose another --out"
        )
    if fmt > RUN_FORMAT:
        raise RefdirError(
            f"{path.parent} was written by a newer refdir (format {fmt}); upgrade refdir or "
            "choose another --out"
        )
    return data


def check_run_folder(path: Path, model: str) -> None:
    """Refuse to mix runs: a folder holding another model's run, or a newer format, is an error."""
    cfg_file = RunFolder(path).config
    if path.exists() and not path.is_dir():
        raise RefdirError(f"--out {path} is a file, not a folder")
    if not cfg_file.exists():
        return
    old = read_meta(cfg_file)
    if old.get("model") not in (None, model):
        raise RefdirError(
            f"run folder {path} holds a run of model '{old['model']}', not '{model}'; choose another --out"
        )


def stage_key(obj: object) -> str:
    """A stage's input hash: short sha256 of its canonical JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:16]


class StageLedger:
    """The writer's side of a run folder: ``stages.json`` records each stage's input hash and time.

    Creating it makes the folder and removes temporary files left by a run killed mid-write.
    """

    def __init__(self, folder: RunFolder, on_done: Callable[[], None] = lambda: None):
        self.folder, self.on_done = folder, on_done
        folder.path.mkdir(parents=True, exist_ok=True)
        self.stages = self._read_stages()
        for stale in folder.path.glob(".*.tmp"):
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()

    def _read_stages(self) -> dict:
        if not self.folder.stages.exists():
            return {}
        stages = read_meta(self.folder.stages).get("stages", {})
        if not isinstance(stages, dict) or not all(isinstance(v, dict) for v in stages.values()):
            raise RefdirError(
                f"{self.folder.stages} is corrupt; delete the run folder or choose another --out"
            )
        return stages

    def fresh(self, stage: str, key: str, *artifacts: Path) -> bool:
        """True when ``stage`` completed with the same inputs and its artifacts are all present."""
        return self.stages.get(stage, {}).get("key") == key and all(a.exists() for a in artifacts)

    def reuse(
        self, stage: str, key: str, artifacts: tuple[Path, ...], must_reuse: tuple[str, ...], log
    ) -> bool:
        """True (and logged) when the stage can be reused; an error when it must be but cannot."""
        if self.fresh(stage, key, *artifacts):
            log(f"{stage}: reused")
            return True
        if stage in must_reuse:
            raise RefdirError(
                f"{self.folder.path}: the {stage} stage is missing or out of date; rerun `refdir extract`"
            )
        return False

    def done(self, stage: str, key: str, seconds: float) -> None:
        from refdir.core.io import write_json

        self.on_done()  # e.g. give the stage's freed buffers back before the next one
        self.stages[stage] = {"key": key, "seconds": round(seconds, 2), "refdir": __version__}
        write_json(self.folder.stages, {"format": RUN_FORMAT, "stages": self.stages})
