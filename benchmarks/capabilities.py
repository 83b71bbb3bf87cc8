"""Capability benchmarks of a finished run: the paper's six through lm-evaluation-harness, baseline vs
orthogonalized on the same items, paired Δ with 95% intervals (the paper's Tables 3 and 6).

    python benchmarks/capabilities.py --run RUN [--limit 100] [--task-limit gsm8k=20] [--tasks paper]
        [--data-dir DIR]
    python benchmarks/capabilities.py --merge A.json B.json ...   # tables of separate invocations, joined

Runs ``refdir capabilities`` on the run's model and direction with the local copies of the benchmarks
(one invocation per distinct item limit: ``--task-limit`` gives a task its own, e.g. GSM8K's 5-shot
generation costs ~20x a log-likelihood task per item), writes ``results/capabilities-<model>.json`` and
prints the table the README shows (N per task, each condition's score, Δ ± CI, and the minutes each task
took for both conditions), with the paper's Table 6 band (|Δ| ≲ 2 points except TruthfulQA) beside each
row. ``--merge`` joins the JSONs of invocations on the same model and direction (one task each, say) into
that file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAPER = ("mmlu", "arc_challenge", "gsm8k", "truthfulqa_mc2", "winogrande", "hellaswag")


def limit_groups(tasks: list[str], limit: int, overrides: list[str]) -> dict[int, list[str]]:
    """{item limit: tasks}: ``--limit`` for every task but those given ``TASK=N``."""
    own = {}
    for o in overrides:
        task, _, n = o.partition("=")
        if task not in tasks or not n.isdigit() or int(n) < 1:
            raise SystemExit(f"--task-limit {o!r}: expected TASK=N with TASK one of {','.join(tasks)}")
        own[task] = int(n)
    groups: dict[int, list[str]] = {}
    for t in tasks:
        groups.setdefault(own.get(t, limit), []).append(t)
    return groups


def merge(parts: list[dict]) -> dict:
    """One result JSON from invocations on the same model and direction (results and per-item scores
    joined; ``settings.limit`` becomes {task: limit})."""
    first = parts[0]
    for p in parts[1:]:
        if (p["model"], p["direction"]) != (first["model"], first["direction"]):
            raise SystemExit("--merge: the JSONs are not of the same model and direction")
    out = {k: v for k, v in first.items() if k not in ("results", "per_item", "wall_seconds")}
    out["settings"] = dict(first["settings"])
    out["settings"]["tasks"] = [t for p in parts for t in p["settings"]["tasks"]]
    out["settings"]["limit"] = {t: p["settings"]["limit"] for p in parts for t in p["settings"]["tasks"]}
    out["per_item"] = {k: v for p in parts for k, v in p.get("per_item", {}).items()}
    out["results"] = [_repaired(r, out["per_item"].get(r["task"], {})) for p in parts for r in p["results"]]
    out["wall_seconds"] = round(sum(p.get("wall_seconds", 0.0) for p in parts), 1)
    return out


def _repaired(r: dict, items: dict) -> dict:
    """``r`` with its paired fields recomputed from the per-item scores by this refdir (JSONs written by an
    older one gain the lost / gained counts and the exact McNemar p-value)."""
    if "baseline" not in items or "orthogonalized" not in items:
        return r
    from refdir.evaluation.capabilities import paired_delta

    return {**r, **paired_delta(items["baseline"], items["orthogonalized"])}


def run_group(a, model: str, tasks: list[str], limit: int, out: Path) -> dict:
    """One ``refdir capabilities`` invocation; its JSON with the invocation's wall time."""
    cmd = [
        sys.executable,
        "-m",
        "refdir.cli",
        "capabilities",
        "--model",
        model,
        "--direction",
        a.run,
        "--tasks",
        ",".join(tasks),
        "--data-dir",
        a.data_dir,
        "--limit",
        str(limit),
        "--batch-size",
        str(a.batch_size),
        "--out",
        str(out),
    ]
    if a.max_gen_toks:
        cmd += ["--max-gen-toks", str(a.max_gen_toks)]
    t = time.time()
    p = subprocess.run(cmd)  # its progress bars and errors go straight to the terminal
    if p.returncode != 0:
        raise SystemExit(f"refdir capabilities failed (exit {p.returncode}; its error is above)")
    res = json.loads(out.read_text())
    res["wall_seconds"] = round(time.time() - t, 1)
    return res


def print_table(res: dict) -> None:
    from refdir.evaluation.capabilities import changed_items

    print(
        f"\n{res['model']}, direction layer {res['direction']['layer']} pos {res['direction']['pos']}; "
        f"{res['wall_seconds'] / 60:.1f} min in all"
    )
    print(
        "| task | metric | n | orthogonalized | baseline (Δ ± 95% CI) | items changed "
        "| within the paper's band | minutes |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in res["results"]:
        half = (r["delta_ci95"][1] - r["delta_ci95"][0]) / 2
        band = (
            "TruthfulQA: paper −1 to −6"
            if r["task"].startswith("truthfulqa")
            else ("yes" if abs(100 * r["delta"]) <= 2 else "no")
        )
        minutes = (r["baseline_seconds"] + r["orthogonalized_seconds"]) / 60
        print(
            f"| {r['task']} | {r['metric']} | {r['n']} | {100 * r['orthogonalized']:.1f} | "
            f"{100 * r['baseline']:.1f} ({100 * r['delta']:+.1f} ± {100 * half:.1f}) | "
            + (changed_items(r) or "-")
            + f" | {band} "
            f"| {minutes:.1f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run")
    ap.add_argument("--tasks", default="paper")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument(
        "--task-limit",
        action="append",
        default=[],
        metavar="TASK=N",
        help="this task's own item limit (repeatable), e.g. gsm8k=20",
    )
    ap.add_argument("--max-gen-toks", type=int, default=None, help="GSM8K token cap (harness default 256)")
    ap.add_argument("--batch-size", type=int, default=8, help="rows per log-likelihood forward")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "benchmarks"))
    ap.add_argument("--out", default=str(ROOT / "results"))
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="join these result JSONs instead of running")
    a = ap.parse_args()
    if a.merge:
        res = merge([json.loads(Path(p).read_text()) for p in a.merge])
    else:
        if not a.run:
            raise SystemExit("--run RUN is required (or --merge JSON ...)")
        model = json.loads((Path(a.run) / "config.json").read_text())["model_spec"]
        tasks = list(PAPER) if a.tasks == "paper" else a.tasks.split(",")
        with tempfile.TemporaryDirectory() as tmp:
            res = merge(
                [
                    run_group(a, model, ts, n, Path(tmp) / f"{n}.json")
                    for n, ts in limit_groups(tasks, a.limit, a.task_limit).items()
                ]
            )
    out = Path(a.out) / f"capabilities-{res['model']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(res, indent=1) + "\n")
    tmp_out.replace(out)
    print_table(res)


if __name__ == "__main__":
    main()
