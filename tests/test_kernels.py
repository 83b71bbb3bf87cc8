"""Strength kernels, interpolated directions and biprojection: values computed by hand."""

import pytest
import torch

from refdir.core.errors import RefdirError
from refdir.method.kernels import biproject, interpolate_direction, strength_kernel


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) < 1e-12 for x, y in zip(a, b))


def test_strength_kernel_is_a_tent():
    # max 1.2 at 3.5, 0.2 at distance 2: layers 2..5 are 1.5, 0.5, 0.5, 1.5 away -> 1.2 - 0.5 * dist
    assert _close(strength_kernel(8, 1.2, 3.5, 0.2, 2.0), [0.0, 0.0, 0.45, 0.95, 0.95, 0.45, 0.0, 0.0])
    # on a layer: the peak itself; min_weight exactly at min_distance (inclusive)
    assert _close(strength_kernel(5, 1.0, 2.0, 0.5, 2.0), [0.5, 0.75, 1.0, 0.75, 0.5])
    # rising kernel (min above max) and a peak at the last layer
    assert _close(strength_kernel(4, 0.8, 3.0, 1.4, 3.0), [1.4, 1.2, 1.0, 0.8])
    assert _close(strength_kernel(3, 1.0, 0.0, 0.0, 0.5), [1.0, 0.0, 0.0])
    for bad in (0.0, -1.0):
        with pytest.raises(RefdirError, match="min_distance must be > 0"):
            strength_kernel(4, 1.0, 1.0, 0.5, bad)


def _dirs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 16, generator=g) * torch.tensor([0.5, 2.0, 3.0, 0.1, 7.0])[:, None]  # [L, d]


def test_interpolate_direction_at_integer_and_fractional_index():
    dirs = _dirs()
    units = dirs.double() / dirs.double().norm(dim=-1, keepdim=True)
    for i in range(5):
        v = interpolate_direction(dirs, float(i))
        assert v.dtype == torch.float32 and v.shape == (16,)
        assert (v.double() - units[i]).abs().max() < 1e-6
    for index, lo, frac in ((1.25, 1, 0.25), (2.5, 2, 0.5), (3.9, 3, 0.9), (0.01, 0, 0.01)):
        v = interpolate_direction(dirs, index).double()
        want = (1 - frac) * units[lo] + frac * units[lo + 1]  # the lerp of unit vectors, not of raw ones
        assert abs(v.norm() - 1) < 1e-6
        assert (v - want / want.norm()).abs().max() < 1e-6
    raw = dirs[1] * 0.75 + dirs[2] * 0.25
    assert (interpolate_direction(dirs, 1.25).double() - raw.double() / raw.norm()).abs().max() > 1e-3
    for bad in (-0.1, 4.01):
        with pytest.raises(RefdirError, match=r"outside 0\.\.4"):
            interpolate_direction(dirs, bad)


def test_biproject_removes_the_harmless_mean():
    g = torch.Generator().manual_seed(1)
    r, m = torch.randn(32, generator=g) * 3, torch.randn(32, generator=g) * 5 + 1
    out = biproject(r, m)
    m_unit = m.double() / m.double().norm()
    assert out.dtype == torch.float32 and abs(out.double().norm() - 1) < 1e-6
    assert abs(out.double() @ m_unit) < 1e-6
    want = r.double() - (r.double() @ m_unit) * m_unit
    assert (out.double() - want / want.norm()).abs().max() < 1e-6
    assert out.double() @ r.double() > 0  # the same side as r
    # per layer: a zero row stays zero, the others are orthogonal to their own layer's mean
    rs, ms = torch.randn(4, 32, generator=g), torch.randn(4, 32, generator=g)
    rs[0] = 0
    outs = biproject(rs, ms)
    assert torch.equal(outs[0], torch.zeros(32))
    ms_unit = ms.double() / ms.double().norm(dim=-1, keepdim=True)
    for i in range(1, 4):
        assert abs(outs[i].double().norm() - 1) < 1e-6
        assert abs(outs[i].double() @ ms_unit[i]) < 1e-6
        assert (outs[i] - biproject(rs[i], ms[i])).abs().max() < 1e-7
    with pytest.raises(RefdirError, match="parallel to the harmless mean"):
        biproject(-3 * m, m)
    rs[2] = 2 * ms[2]
    with pytest.raises(RefdirError, match="parallel to the harmless mean"):
        biproject(rs, ms)
