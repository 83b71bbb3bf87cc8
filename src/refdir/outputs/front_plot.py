"""The Pareto front of a refusal-edit search (``front.json`` from ``refdir search``): figure and section.

A search trades refusal left on harmful prompts against damage to harmless behaviour (first-token KL
from the unedited model). One point is one edit; the user wants the points no other point beats on
both, so the figure draws every trial, the fronts as step lines and, where given, another tool's points
on the same axes. Proxy scores (first token only) and confirmed scores (generated and judged) are drawn
apart: the proxy front is what the search optimised, the confirmed front is what can be claimed.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import TypeGuard

from refdir.outputs.page import html_table, png_uri, save_png

X_LABEL = "first-token KL on harmless prompts (edited ‖ unedited)"
Y_LABEL = "refusal rate on harmful prompts"
COMPARE_STYLES = [("tab:orange", "s"), ("tab:purple", "^"), ("tab:green", "D"), ("tab:brown", "v")]


def _finite(p: dict | None) -> TypeGuard[dict]:
    """Whether a score pair can be drawn (a failed trial may carry NaN or no scores)."""
    return isinstance(p, dict) and all(
        isinstance(p.get(k), (int, float)) and math.isfinite(p[k]) for k in ("kl", "refusal")
    )


def pareto(points: list[dict]) -> list[dict]:
    """The points no other point beats on both refusal and KL (lower is better), by increasing KL.

    Used for a compared tool's points, which come without a front; the search's own fronts are read
    from ``front.json`` so the report shows the front the search reported."""
    front: list[dict] = []
    for p in sorted((p for p in points if _finite(p)), key=lambda p: (p["kl"], p["refusal"])):
        if not front or p["refusal"] < front[-1]["refusal"]:
            front.append(p)
    return front


def _step(ax, points: list[dict], **style) -> None:
    """A front as a step line: from each point's KL on, its refusal rate is the best reachable."""
    pts = sorted((p for p in points if _finite(p)), key=lambda p: p["kl"])
    if pts:
        ax.step([p["kl"] for p in pts], [p["refusal"] for p in pts], where="post", **style)


def _paper_trials(trials: list[dict]) -> list[dict]:
    """The paper's direction as a trial: flagged ``paper``, else trial 0 (the search enqueues it first)."""
    return [t for t in trials if t.get("paper")] or [t for t in trials if t.get("number") == 0]


def _draw_search(ax, front: dict) -> list[float]:
    """The search's trials, proxy and confirmed fronts and the paper point; returns the KLs drawn."""
    trials = front.get("trials", [])
    by_number = {t["number"]: t for t in trials}
    proxy = [t["proxy"] for t in trials if _finite(t.get("proxy"))]
    confirmed = [t["confirmed"] for t in trials if _finite(t.get("confirmed"))]
    ax.scatter([p["kl"] for p in proxy], [p["refusal"] for p in proxy], s=10, c="0.6", label="trial (proxy)")
    proxy_front = [by_number[n]["proxy"] for n in front.get("front", []) if n in by_number]
    _step(ax, proxy_front, color="0.45", lw=1, label="proxy front")
    if confirmed:
        ax.scatter(
            [p["kl"] for p in confirmed],
            [p["refusal"] for p in confirmed],
            s=36,
            c="tab:blue",
            edgecolors="k",
            linewidths=0.5,
            zorder=3,
            label="confirmed (generated, judged)",
        )
    conf_front = [by_number[n]["confirmed"] for n in front.get("confirmed_front", []) if n in by_number]
    _step(ax, conf_front, color="tab:blue", lw=1.8, label="confirmed front")
    for t in _paper_trials(trials):
        p = t["confirmed"] if _finite(t.get("confirmed")) else t.get("proxy")
        if _finite(p):
            ax.scatter([p["kl"]], [p["refusal"]], marker="*", s=180, c="gold", edgecolors="k", zorder=4)
            ax.annotate("paper direction", (p["kl"], p["refusal"]), xytext=(6, 6), textcoords="offset points")
    return [p["kl"] for p in proxy + confirmed]


def _draw_compare(ax, compare: list[dict]) -> list[float]:
    """Each other tool's points in its own colour and marker, its front dashed, its chosen point
    labelled; returns the KLs drawn."""
    kls: list[float] = []
    for i, tool in enumerate(compare):
        color, marker = COMPARE_STYLES[i % len(COMPARE_STYLES)]
        name = str(tool.get("name", f"tool {i + 1}"))
        pts = [p for p in tool.get("points", []) if _finite(p)]
        if pts:
            ax.scatter(
                [p["kl"] for p in pts], [p["refusal"] for p in pts], s=22, c=color, marker=marker, label=name
            )
            _step(ax, pareto(pts), color=color, ls="--", lw=1.2, label=f"{name} front")
        chosen = tool.get("chosen")
        if _finite(chosen):
            ax.scatter([chosen["kl"]], [chosen["refusal"]], s=90, c=color, marker=marker, edgecolors="k")
            ax.annotate(
                f"{name} chosen",
                (chosen["kl"], chosen["refusal"]),
                xytext=(6, -12),
                textcoords="offset points",
            )
            kls.append(chosen["kl"])
        kls += [p["kl"] for p in pts]
    return kls


def front_figure(front: dict) -> str:
    """Refusal rate against first-token KL for every trial, the fronts and any compared tool, as a PNG
    data URI. KL is on a log scale when every KL drawn is positive: trials spread over decades of KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    kls = _draw_search(ax, front) + _draw_compare(ax, front.get("compare") or [])
    if kls and min(kls) > 0:
        ax.set_xscale("log")
    ax.set_xlabel(X_LABEL)
    ax.set_ylabel(Y_LABEL)
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(f"Refusal-edit search: {front.get('model', '')}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return png_uri(fig)


def save_front_png(front: dict, path: str | Path) -> None:
    """The front figure as a PNG file, for benchmark write-ups and the README."""
    save_png(Path(path), front_figure(front))


def front_section(front: dict) -> str:
    """The report's section: the figure, the confirmed front as a table and how to export one point."""
    trials = front.get("trials", [])
    by_number = {t["number"]: t for t in trials}
    paper = {t["number"] for t in _paper_trials(trials)}
    rows = []
    for n in front.get("confirmed_front", []):
        c = (by_number.get(n) or {}).get("confirmed") or {}
        rows.append(
            [
                n,
                c.get("refusal"),
                c.get("n_harmful"),
                c.get("kl"),
                c.get("n_harmless"),
                "yes" if n in paper else "",
            ]
        )
    rows.sort(key=lambda r: r[3] if isinstance(r[3], (int, float)) else math.inf)
    n_confirmed = sum(1 for t in trials if t.get("confirmed"))
    table = (
        html_table(
            ["trial", "refusal rate", "n harmful", "first-token KL", "n harmless", "paper direction"], rows
        )
        if rows
        else "<p class=note>No trial confirmed yet.</p>"
    )
    return (
        f"<h2>Refusal-edit search (Pareto front)</h2><p>{len(trials)} trials on "
        f"<code>{html.escape(str(front.get('model', '')))}</code>, {n_confirmed} confirmed by generation. "
        "Grey: first-token proxy scores (what the search optimised); blue: confirmed scores, "
        "generated and judged. Lower is better on both axes.</p>"
        f"<img src='{front_figure(front)}'><p>Confirmed front, by increasing KL:</p>{table}"
        "<p>Export a point as a model: <code>refdir export --run RUN --trial N</code> "
        "(N from the trial column).</p>"
    )
