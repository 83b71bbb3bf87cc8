"""What ``refdir search`` samples: trial parameters -> a :class:`~refdir.method.weighted.WeightedAblation`.

One space, declared once (:func:`distributions`): the direction (a fractional layer index into the run's
candidates at the selected position, or one direction per layer; optionally biprojected off the harmless
mean), a strength kernel per component (heretic's tent: max weight, its position, min weight as a fraction
of it, its distance), whether the embeddings are edited, and which channel norms are kept. Trial 0 is the
paper's selected direction as the paper orthogonalizes it (``{"paper": true}``). Parameters are plain
JSON, so ``front.json`` alone (with the run's candidates) rebuilds any trial's edit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from refdir.core.errors import RefdirError
from refdir.method.kernels import biproject, interpolate_direction, strength_kernel
from refdir.method.weighted import WeightedAblation

PAPER = {"paper": True}
COMPONENTS = ("attn", "mlp")


@dataclass
class SearchSpace:
    """The run's candidates at the selected position and the paper's direction; with
    ``all_candidates``, every post-instruction position is a choice too (``position``, counted from the
    end like the run's ``pos``; heretic uses the last token, the paper selects one)."""

    candidates: torch.Tensor  # [L, d]: difference of means at every layer (selected position)
    harmless_mean: torch.Tensor  # [L, d]: mean harmless activation, same position
    paper_direction: torch.Tensor  # [d]
    norms: tuple[str, ...] = ("none", "output")  # channel norms a trial may keep
    paper_layer: int = -1  # the paper direction's layer (its candidate row), -1: unknown
    all_candidates: torch.Tensor | None = None  # [P, L, d]: every post-instruction position
    all_harmless: torch.Tensor | None = None  # [P, L, d]
    paper_pos: int = -1  # the selected position, counted from the end (-P..-1)

    @property
    def n_layers(self) -> int:
        return int(self.candidates.shape[0])


def distributions(space: SearchSpace) -> dict[str, Any]:
    """Optuna distributions of every parameter (the same for every trial: multivariate TPE needs that)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    last = space.n_layers - 1
    out: dict[str, Any] = {
        "scope": CategoricalDistribution(["global", "per_layer"]),
        "direction_index": FloatDistribution(0.4 * last, 0.9 * last),
        "biproject": CategoricalDistribution([False, True]),
        "embed": CategoricalDistribution([0.0, 1.0]),
        "norm": CategoricalDistribution(list(space.norms)),
    }
    if space.all_candidates is not None and space.all_candidates.shape[0] > 1:
        out["position"] = CategoricalDistribution(list(range(-space.all_candidates.shape[0], 0)))
    for c in COMPONENTS:
        out[f"{c}.max_weight"] = FloatDistribution(0.8, 1.5)
        out[f"{c}.max_position"] = FloatDistribution(0.4 * last, 1.0 * last)
        out[f"{c}.min_weight"] = FloatDistribution(0.0, 1.0)  # a fraction of max_weight
        out[f"{c}.min_distance"] = FloatDistribution(1.0, 0.8 * last)
    return out


def sample(trial: Any, space: SearchSpace) -> dict[str, Any]:
    """Draw every parameter of :func:`distributions` from an Optuna trial."""
    from optuna.distributions import FloatDistribution

    return {
        name: trial.suggest_float(name, dist.low, dist.high)
        if isinstance(dist, FloatDistribution)
        else trial.suggest_categorical(name, dist.choices)
        for name, dist in distributions(space).items()
    }


def _at(params: dict[str, Any], space: SearchSpace) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates and harmless means ``[L, d]`` at the trial's position (the selected one by default)."""
    if "position" not in params or space.all_candidates is None or space.all_harmless is None:
        return space.candidates, space.harmless_mean
    p = int(params["position"])
    return space.all_candidates[p], space.all_harmless[p]


def _direction(params: dict[str, Any], space: SearchSpace) -> torch.Tensor:
    """``[d]`` (global) or ``[L, 1, d]`` (per layer), biprojected if asked.

    Per layer, the writers of layer l remove the direction of the stream they write into — layer l+1's
    input (the last layer's own) — as heretic does; layer 0's input is the embeddings, whose difference
    of means at template positions is zero."""
    cands, means = _at(params, space)
    if params["scope"] == "per_layer":
        nxt = torch.cat([torch.arange(1, space.n_layers), torch.tensor([space.n_layers - 1])])
        dirs = torch.nn.functional.normalize(cands[nxt].double(), dim=-1).float()  # [L, d]
        if params["biproject"]:
            dirs = biproject(dirs, means[nxt])
        return dirs[:, None]
    index = float(params["direction_index"])
    v = interpolate_direction(cands, index)
    if params["biproject"]:
        lo, hi = int(index), min(int(index) + 1, space.n_layers - 1)
        v = biproject(v, torch.lerp(means[lo].double(), means[hi].double(), index - int(index)))
    return v


def edit_for(params: dict[str, Any], space: SearchSpace) -> WeightedAblation:
    """The edit a trial's parameters describe (``PAPER``: the paper's orthogonalization)."""
    if params.get("paper"):
        return WeightedAblation.paper(space.paper_direction, space.n_layers)
    missing = sorted(set(distributions(space)) - set(params))
    if missing:
        raise RefdirError(f"trial parameters lack {missing[0]}")
    kernels = {
        c: strength_kernel(
            space.n_layers,
            params[f"{c}.max_weight"],
            params[f"{c}.max_position"],
            params[f"{c}.min_weight"] * params[f"{c}.max_weight"],
            params[f"{c}.min_distance"],
        )
        for c in COMPONENTS
    }
    return WeightedAblation(
        _direction(params, space),
        kernels["attn"],
        kernels["mlp"],
        embed=float(params["embed"]),
        norm=str(params["norm"]),
    )


def anchors(space: SearchSpace) -> list[dict[str, Any]]:
    """Points of the space worth scoring first: the paper's direction with full strength everywhere,
    with each kept norm, and biprojected — how much do norm preservation and biprojection alone change the
    paper's point? (Empty when the paper's layer is outside the sampled index range.)"""
    dists = distributions(space)
    lo, hi = dists["direction_index"].low, dists["direction_index"].high
    if not lo <= space.paper_layer <= hi:
        return []
    last = space.n_layers - 1
    flat = {}
    for c in COMPONENTS:  # weight 1 on every layer: max = min = 1 around the middle, reaching both ends
        flat.update({f"{c}.max_weight": 1.0, f"{c}.max_position": last / 2, f"{c}.min_weight": 1.0})
        flat[f"{c}.min_distance"] = 0.8 * last
    base = {"scope": "global", "direction_index": float(space.paper_layer), "embed": 1.0, **flat}
    if "position" in dists:
        base["position"] = space.paper_pos
    out = [{**base, "biproject": False, "norm": n} for n in space.norms if n != "none"]
    return out + [{**base, "biproject": True, "norm": n} for n in space.norms]
