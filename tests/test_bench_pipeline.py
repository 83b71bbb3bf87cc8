"""benchmarks/pipeline.py's FLOP accounting: the linear shapes it logs and replays per phase."""

import importlib.util
from pathlib import Path

import pytest
import torch

from tests.tiny import tiny_model


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "pipeline.py"
    spec = importlib.util.spec_from_file_location("bench_pipeline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_linear_shapes_match_the_hook_count_and_replay_per_phase(bench):
    """The logged (rows, in, out) of every linear call give the FLOP count's numbers phase by phase, and
    the replay gives each phase seconds that grow with its work (a prefill of 3 x 9 tokens against
    decode-like calls of 3 rows)."""
    model, _ = tiny_model("qwen2")
    phase = ["prefill"]
    counter = bench.FlopCounter(model, lambda: phase[0])
    shapes = bench.LinearShapes(model, lambda: phase[0])
    ids = torch.randint(3, 600, (3, 9), device=model.device)
    with torch.no_grad():
        model(input_ids=ids)
        phase[0] = "decode"
        for t in range(2):
            model(input_ids=ids[:, t : t + 1], logits_to_keep=1)
    counter.remove()
    shapes.remove()
    flops = shapes.flops()
    assert set(flops) == {"prefill", "decode"}
    for p in flops:
        assert flops[p] == pytest.approx(counter.by_phase[p], rel=1e-9)
    assert flops["prefill"] == pytest.approx(flops["decode"] * 27 / 6, rel=1e-9)  # rows x calls
    seconds = bench.shape_bound(shapes.calls, min_seconds=0.002)
    assert seconds["prefill"] > 0 and seconds["decode"] > 0
    n_calls = sum(shapes.calls["decode"].values())
    assert n_calls == 2 * (4 * 7 + 1)  # per step: 4 layers x 7 linears, and the unembedding


def test_grid_rows_rounds_to_quarter_octaves_and_caps(bench):
    mod = bench
    assert [mod.grid_rows(m) for m in (1, 2, 3, 4)] == [1, 2, 3, 4]
    for m in (17, 100, 333, 1500):
        assert abs(mod.grid_rows(m) / m - 1) < 0.1
    assert mod.grid_rows(100_000) == 2048 and mod.grid_rows(0) == 1
