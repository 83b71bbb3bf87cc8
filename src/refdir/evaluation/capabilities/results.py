"""A capability run's results: per-item scores as JSON, the paired comparison and the paper's table.

Torch-free and lm-eval-free: the report and the run summary read ``capabilities.json`` through these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from refdir.evaluation.capabilities.stats import changed_items, mean_stderr, paired_delta

if TYPE_CHECKING:
    from refdir.evaluation.capabilities.tasks import TaskPlan


@dataclass
class TaskScores:
    """One task's per-item scores under one condition (items in the harness's doc order)."""

    task: str
    metric: str
    items: list[float]  # per item, in doc_id order (MMLU: subjects in order, then doc_id)
    seconds: float

    @property
    def score(self) -> float:
        return sum(self.items) / len(self.items) if self.items else float("nan")


def scores_to_json(scores: dict[str, TaskScores]) -> dict:
    return {
        n: {"metric": s.metric, "items": s.items, "seconds": round(s.seconds, 2)} for n, s in scores.items()
    }


def scores_from_json(d: dict) -> dict[str, TaskScores]:
    return {n: TaskScores(n, v["metric"], [float(x) for x in v["items"]], v["seconds"]) for n, v in d.items()}


def compare(baseline: dict[str, TaskScores], treated: dict[str, TaskScores] | None) -> list[dict]:
    """One row per task: each condition's score and stderr, and the paired Δ with its 95% interval."""
    rows = []
    for name, b in baseline.items():
        row = {
            "task": name,
            "metric": b.metric,
            "n": len(b.items),
            "baseline": b.score,
            "baseline_stderr": mean_stderr(b.items),
            "baseline_seconds": round(b.seconds, 1),
        }
        if treated is not None:
            o = treated[name]
            row.update(
                {
                    "orthogonalized": o.score,
                    "orthogonalized_stderr": mean_stderr(o.items),
                    "orthogonalized_seconds": round(o.seconds, 1),
                    **paired_delta(b.items, o.items),
                }
            )
        rows.append(row)
    return rows


def result_json(
    model: str | None,
    direction,
    plan: TaskPlan,
    base: dict[str, TaskScores],
    treated: dict[str, TaskScores] | None,
    batches: dict,
) -> dict:
    """The output: ``{"model", "direction", "settings", "results": [...], "per_item": {...}}``."""
    return {
        "model": model,
        "direction": direction.meta() if direction is not None else None,
        "settings": {**plan.settings, **batches},
        "results": compare(base, treated),
        "per_item": {
            n: {"baseline": base[n].items, **({"orthogonalized": treated[n].items} if treated else {})}
            for n in base
        },
    }


def table_rows(res: dict) -> list[tuple[str, str, str, str]]:
    """(task, n, orthogonalized, baseline (Δ ± CI)) in points, the paper's Table 3 layout."""
    rows = []
    for r in res["results"]:
        if "orthogonalized" in r:
            half = (r["delta_ci95"][1] - r["delta_ci95"][0]) / 2
            rows.append(
                (
                    r["task"],
                    str(r["n"]),
                    f"{100 * r['orthogonalized']:.1f}",
                    f"{100 * r['baseline']:.1f} ({100 * r['delta']:+.1f} ± {100 * half:.1f}"
                    + (f"; {changed_items(r)})" if changed_items(r) else ")"),
                )
            )
        else:
            rows.append(
                (r["task"], str(r["n"]), "-", f"{100 * r['baseline']:.1f} ± {196 * r['baseline_stderr']:.1f}")
                # one condition: its own 95% interval
            )
    return rows


def print_table(res: dict) -> None:
    print(f"{'task':16} {'n':>6} {'ortho':>7}  baseline (delta +- 95% CI, points)")
    for task, n, o, b in table_rows(res):
        print(f"{task:16} {n:>6} {o:>7}  {b}")
