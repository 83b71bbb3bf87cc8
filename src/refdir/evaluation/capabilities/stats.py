"""Paired statistics of two conditions scored on the same items: torch-free, lm-eval-free.

With 100 items an unpaired 95% interval is about ±9 points; the paired one below resolves the 1–2 point
changes the paper reports, and for right/wrong scores the exact McNemar test says how many items moved.
"""

from __future__ import annotations

import math


def mean_stderr(x: list[float]) -> float:
    """The standard error of a mean (sample standard deviation / sqrt(n)), as the harness reports it."""
    n = len(x)
    if n < 2:
        return float("nan")
    m = sum(x) / n
    return math.sqrt(sum((v - m) ** 2 for v in x) / (n - 1) / n)


def mcnemar_exact(lost: int, gained: int) -> float:
    """Two-sided exact McNemar p-value: under "no change" each discordant item (right in one condition
    only) is equally likely to go either way, so min(lost, gained) follows Binomial(lost + gained, 1/2)."""
    n, k = lost + gained, min(lost, gained)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def changed_items(r: dict) -> str:
    """``"4 lost, 0 gained, exact p 0.12"`` for a right/wrong result (``""`` for others): the items
    behind its Δ, as the table, the report and the run summary print them."""
    if "mcnemar_p" not in r:
        return ""
    return f"{r['lost']} lost, {r['gained']} gained, exact p {r['mcnemar_p']:.2g}"


def paired_delta(baseline: list[float], treated: list[float], z: float = 1.959964) -> dict:
    """Δ = mean(treated − baseline) over the same items, its paired standard error and 95% interval.

    The analytic paired form: the per-item differences d_i have standard error sd(d)/sqrt(n), which is
    small when both conditions get the same items right (their covariance cancels), unlike the unpaired
    sqrt(se_b² + se_t²). For right/wrong scores the interval rests on the few items that changed, and
    with a handful of them the normal form is too narrow (4 lost, 0 gained of 114 excludes 0, yet a
    fair coin gives 4-0 one time in eight): those also get the items lost and gained and the exact
    McNemar p-value."""
    if len(baseline) != len(treated):
        raise ValueError(f"paired scores need the same items: {len(baseline)} vs {len(treated)}")
    d = [t - b for b, t in zip(baseline, treated)]
    delta = sum(d) / len(d) if d else float("nan")
    se = mean_stderr(d)
    out = {
        "delta": delta,
        "delta_stderr": se,
        "delta_ci95": [float("nan")] * 2 if se != se else [delta - z * se, delta + z * se],
    }
    if all(v in (0.0, 1.0) for v in baseline + treated):
        lost = sum(1 for b, t in zip(baseline, treated) if b > t)
        gained = sum(1 for b, t in zip(baseline, treated) if t > b)
        out.update(lost=lost, gained=gained, mcnemar_p=mcnemar_exact(lost, gained))
    return out
