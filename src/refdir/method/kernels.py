"""The search space of weight edits: strength kernels over layers, interpolated and biprojected directions.

Parametrizations a search samples (heretic's, read from its 1.4 source, plus the paper's point):

* :func:`strength_kernel` — per component, a tent over layers: ``max_weight`` at ``max_position``, falling
  linearly to ``min_weight`` at ``min_distance`` layers away, zero beyond;
* :func:`interpolate_direction` — a fractional layer index between two layers' candidate directions;
* :func:`biproject` — the direction with its component along the harmless mean removed ("projected
  abliteration"), so the edit leaves the harmless mean's direction alone.

They produce the fields of :class:`~refdir.method.weighted.WeightedAblation`; nothing here touches a model.
"""

from __future__ import annotations

import math

import torch

from refdir.core.errors import RefdirError


def strength_kernel(
    n_layers: int, max_weight: float, max_position: float, min_weight: float, min_distance: float
) -> list[float]:
    """Strength per layer ``[n_layers]``: ``max_weight`` at ``max_position``, linear to ``min_weight`` at
    ``min_distance`` layers away, 0 farther (heretic's kernel; ``min_distance`` > 0)."""
    if min_distance <= 0:
        raise RefdirError(f"min_distance must be > 0, got {min_distance}")
    out = []
    for layer in range(n_layers):
        dist = abs(layer - max_position)
        out.append(
            0.0 if dist > min_distance else max_weight + dist / min_distance * (min_weight - max_weight)
        )
    return out


def interpolate_direction(directions: torch.Tensor, index: float) -> torch.Tensor:
    """Unit direction at a fractional layer ``index`` of ``directions`` ``[L, d]``: the normalized lerp of
    the two neighbouring layers' unit directions (an integer index gives that layer's direction)."""
    n = directions.shape[0]
    if not 0 <= index <= n - 1:
        raise RefdirError(f"direction index {index} is outside 0..{n - 1}")
    units = torch.nn.functional.normalize(directions.double(), dim=-1)
    frac, low = math.modf(index)
    lo = int(low)
    hi = min(lo + 1, n - 1)
    v = torch.lerp(units[lo], units[hi], frac)
    return (v / v.norm()).float()


def biproject(direction: torch.Tensor, harmless_mean: torch.Tensor) -> torch.Tensor:
    """Unit direction(s) with the component along the harmless mean removed: ``[d]`` with ``[d]`` or
    per layer ``[L, d]`` with ``[L, d]``. Why: ablating r̂ then leaves the harmless mean's direction (what
    ordinary prompts share) untouched, which heretic and grimjim report lowers the damage."""
    r = torch.nn.functional.normalize(direction.double(), dim=-1)
    m = torch.nn.functional.normalize(harmless_mean.double(), dim=-1)
    out = r - (r * m).sum(-1, keepdim=True) * m
    small = out.norm(dim=-1) < 1e-6  # a zero input row (a layer with no difference of means) stays zero
    if (small & (r.norm(dim=-1) > 0)).any():
        raise RefdirError("the direction is parallel to the harmless mean: nothing is left to ablate")
    return torch.nn.functional.normalize(out, dim=-1).float()
