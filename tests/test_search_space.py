"""The search space: trial parameters -> the WeightedAblation they describe (kernels, directions, norms)."""

import json

import optuna
import pytest
import torch

from refdir.core.errors import RefdirError
from refdir.method.kernels import biproject, interpolate_direction, strength_kernel
from refdir.method.search_space import PAPER, SearchSpace, anchors, distributions, edit_for, sample
from refdir.method.weighted import WeightedAblation

L, D = 6, 32


def _space(norms=("none", "output")) -> SearchSpace:
    g = torch.Generator().manual_seed(0)
    cand = torch.randn(L, D, generator=g) * torch.arange(1, L + 1)[:, None]
    return SearchSpace(cand, torch.randn(L, D, generator=g) + 2, torch.randn(D, generator=g), norms)


def _params(**kw) -> dict:
    p = {
        "scope": "global",
        "direction_index": 3.4,
        "biproject": False,
        "embed": 1.0,
        "norm": "output",
        "attn.max_weight": 1.2,
        "attn.max_position": 4.0,
        "attn.min_weight": 0.5,
        "attn.min_distance": 2.0,
        "mlp.max_weight": 0.9,
        "mlp.max_position": 2.5,
        "mlp.min_weight": 0.0,
        "mlp.min_distance": 3.0,
    }
    return {**p, **kw}


def _inside(params: dict, dists: dict) -> bool:
    """Every parameter of the space, each within its distribution's bounds or choices."""
    return set(params) == set(dists) and all(
        d.low <= params[k] <= d.high
        if isinstance(d, optuna.distributions.FloatDistribution)
        else params[k] in d.choices
        for k, d in dists.items()
    )


def test_paper_params_give_the_papers_orthogonalization():
    space = _space()
    e = edit_for(PAPER, space)
    want = WeightedAblation.paper(space.paper_direction, L)
    assert e.to_json() == want.to_json()
    assert (e.attn, e.mlp, e.embed, e.norm) == ([1.0] * L, [1.0] * L, 1.0, "none")
    assert torch.equal(e.directions, space.paper_direction)


def test_kernels_and_global_direction():
    space = _space()
    p = _params()
    e = edit_for(p, space)
    # min_weight is a fraction of max_weight: attn 0.6 at distance 2 of layer 4
    assert e.attn == strength_kernel(L, 1.2, 4.0, 0.6, 2.0)
    assert e.attn == pytest.approx([0.0, 0.0, 0.6, 0.9, 1.2, 0.9])
    assert e.mlp == strength_kernel(L, 0.9, 2.5, 0.0, 3.0)
    assert e.mlp == pytest.approx([0.15, 0.45, 0.75, 0.75, 0.45, 0.15])
    assert (e.embed, e.norm, e.vector_strengths) == (1.0, "output", None)
    assert torch.equal(e.directions, interpolate_direction(space.candidates, 3.4))
    # biprojected: off the harmless mean lerped at the same index
    b = edit_for(_params(biproject=True), space).directions
    mean = torch.lerp(space.harmless_mean[3].double(), space.harmless_mean[4].double(), 0.4)
    assert abs(b.double() @ (mean / mean.norm())) < 1e-6 and abs(b.norm() - 1) < 1e-6
    assert (b - biproject(interpolate_direction(space.candidates, 3.4), mean)).abs().max() < 1e-7
    last = edit_for(_params(biproject=True, direction_index=float(L - 1)), space).directions
    assert (last - biproject(space.candidates[L - 1], space.harmless_mean[L - 1])).abs().max() < 1e-6


def test_per_layer_directions():
    space = _space()
    e = edit_for(_params(scope="per_layer", embed=0.0, norm="none"), space)
    assert e.directions.shape == (L, 1, D)
    units = space.candidates / space.candidates.norm(dim=-1, keepdim=True)
    nxt = list(range(1, L)) + [L - 1]  # layer l's writers: the direction of layer l+1's input
    assert (e.directions[:, 0] - units[nxt]).abs().max() < 1e-6
    assert (e.embed, e.norm) == (0.0, "none")
    bi = edit_for(_params(scope="per_layer", biproject=True), space).directions[:, 0].double()
    means = space.harmless_mean.double() / space.harmless_mean.double().norm(dim=-1, keepdim=True)
    means = means[nxt]
    assert (bi * means).sum(-1).abs().max() < 1e-6
    assert (bi.norm(dim=-1) - 1).abs().max() < 1e-6


def test_sampled_params_build_their_kernels():
    """Params drawn by Optuna are in their distributions' bounds, are plain JSON, and build the kernels."""
    space = _space(("none", "input"))
    dists = distributions(space)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(3))
    seen = set()
    for _ in range(12):
        t = study.ask()
        p = sample(t, space)
        assert _inside(p, dists)
        assert p["norm"] in ("none", "input")
        seen.add((p["scope"], p["biproject"]))
        e = edit_for(json.loads(json.dumps(p)), space)
        for c in ("attn", "mlp"):
            want = strength_kernel(
                L,
                p[f"{c}.max_weight"],
                p[f"{c}.max_position"],
                p[f"{c}.min_weight"] * p[f"{c}.max_weight"],
                p[f"{c}.min_distance"],
            )
            assert getattr(e, c) == want
        assert e.embed == p["embed"] and e.norm == p["norm"]
        assert torch.equal(e.directions, edit_for(p, space).directions)
        study.tell(t, [0.0, 0.0])
    assert len(seen) >= 3


def test_anchors_are_the_papers_direction_at_full_strength():
    """With the paper's layer in the sampled index range: the paper's direction at strength 1 everywhere with
    each kept norm (its "none" point is trial 0), and biprojected with each norm; all inside the space."""
    space = _space(("none", "output", "input"))
    space.paper_layer = 3
    points = anchors(space)
    got = [(p["biproject"], p["norm"]) for p in points]
    assert got == [(False, "output"), (False, "input"), (True, "none"), (True, "output"), (True, "input")]
    dists = distributions(space)
    unit = space.candidates[3] / space.candidates[3].norm()
    for p in points:
        assert _inside(p, dists)
        e = edit_for(p, space)
        assert (e.attn, e.mlp, e.embed, e.norm) == ([1.0] * L, [1.0] * L, 1.0, p["norm"])
        want = biproject(space.candidates[3], space.harmless_mean[3]) if p["biproject"] else unit
        assert (e.directions - want).abs().max() < 1e-6
    for layer in (-1, 1, 5):  # unknown, or outside the direction index range [0.4, 0.9] * 5
        space.paper_layer = layer
        assert anchors(space) == []


def test_missing_params_raise():
    space = _space()
    for name in ("norm", "attn.min_distance", "scope"):
        p = _params()
        del p[name]
        with pytest.raises(RefdirError, match=f"trial parameters lack {name}"):
            edit_for(p, space)
    with pytest.raises(RefdirError, match="trial parameters lack"):
        edit_for({"paper": False}, space)


def test_position_is_a_choice_when_every_position_is_given():
    """With the candidates of every post-instruction position, ``position`` picks the row (from the end);
    without it, the selected position's candidates are used."""
    space = _space()
    g = torch.Generator().manual_seed(9)
    space.all_candidates = torch.randn(3, L, D, generator=g)
    space.all_harmless = torch.randn(3, L, D, generator=g) + 2
    space.paper_pos = -2
    assert distributions(space)["position"].choices == (-3, -2, -1)
    for pos in (-3, -1):
        e = edit_for(_params(scope="global", biproject=False, position=pos), space)
        want = interpolate_direction(space.all_candidates[pos], _params()["direction_index"])
        assert (e.directions - want).abs().max() < 1e-6
    space.paper_layer = 3
    assert all(p["position"] == -2 for p in anchors(space))
    assert "position" not in distributions(_space())
