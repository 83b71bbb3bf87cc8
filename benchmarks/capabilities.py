"""Capability benchmarks of a finished run: the paper's six through lm-evaluation-harness, baseline vs
orthogonalized on the same items, paired Δ with 95% intervals (the paper's Tables 3 and 6).

    python benchmarks/capabilities.py --run RUN [--limit 100] [--tasks paper] [--data-dir DIR]

Runs ``refdir capabilities`` on the run's model and direction with the local copies of the benchmarks,
writes ``results/capabilities-<model>.json`` and prints the table the README shows (N per task, each
condition's score, Δ ± CI, and the minutes each task took for both conditions), with the paper's Table 6
band (|Δ| ≲ 2 points except TruthfulQA) beside each row.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--tasks", default="paper")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--max-gen-toks", type=int, default=None, help="GSM8K token cap (harness default 256)")
    ap.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="rows per forward (the harness keeps [rows, tokens, vocab] log-probs: small on the CPU)",
    )
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "benchmarks"))
    ap.add_argument("--out", default=str(ROOT / "results"))
    a = ap.parse_args()
    run = Path(a.run)
    model = json.loads((run / "config.json").read_text())["model_spec"]
    out = Path(a.out) / f"capabilities-{Path(model).name}.json"
    cmd = [
        sys.executable,
        "-m",
        "refdir.cli",
        "capabilities",
        "--model",
        model,
        "--direction",
        str(run),
        "--tasks",
        a.tasks,
        "--data-dir",
        a.data_dir,
        "--limit",
        str(a.limit),
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
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(
        f"\n{model}, direction layer {res['direction']['layer']} pos {res['direction']['pos']}; "
        f"{res['wall_seconds'] / 60:.1f} min in all"
    )
    print(
        "| task | metric | n | orthogonalized | baseline (Δ ± 95% CI) | within the paper's band | minutes |"
    )
    print("|---|---|---|---|---|---|---|")
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
            f"{100 * r['baseline']:.1f} ({100 * r['delta']:+.1f} ± {100 * half:.1f}) | {band} "
            f"| {minutes:.1f} |"
        )


if __name__ == "__main__":
    main()
