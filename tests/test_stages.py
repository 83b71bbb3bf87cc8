"""The stage table's keys: what makes a finished stage rerun."""

from __future__ import annotations

from pathlib import Path

import torch

from refdir.evaluation.probe_judge import Probe
from refdir.run.settings import RunConfig
from refdir.run.stages import STAGES, judge_key


def _probe(path: Path, bias: float) -> Path:
    d = 4
    Probe(
        "/no/such/judge-model", 1, 100, torch.zeros(d), torch.ones(d), torch.zeros(3, d),
        torch.tensor([bias, 0.0, 0.0]), 1.0,
    ).save(path)  # fmt: skip
    return path


def _evaluate_key(cfg: RunConfig) -> dict:
    return next(s for s in STAGES if s.name == "evaluate").settings(cfg)


def test_a_probe_retrained_in_place_changes_the_evaluate_key(tmp_path: Path) -> None:
    path = _probe(tmp_path / "p.safetensors", 0.0)
    cfg = RunConfig(judge=f"probe:{path}")
    before = _evaluate_key(cfg)
    assert before == _evaluate_key(cfg)  # same file, same key: a finished stage is kept
    _probe(path, 1.0)  # same path, new weights
    after = _evaluate_key(cfg)
    assert after != before and after["judge"].startswith(f"probe:{path}#")


def test_rule_judges_key_by_name_alone() -> None:
    assert judge_key("substring") == "substring"
    assert judge_key(None) is None
    assert _evaluate_key(RunConfig(judge="none"))["judge"] is None
