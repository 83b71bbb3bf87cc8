"""Beyond one direction, measured on a finished run: the refusal monitor, the refusal cone, the COSMIC
selector against the paper's, and the audit page.

    python benchmarks/beyond.py --run runs/results-qwen2.5-coder-1.5b-instruct [--max-rank 4] [--out results/]

Runs, in this order and each timed: ``refdir monitor`` (JailbreakBench vs Alpaca held-out prompts of the
run, GCG-suffixed ones when the run has suffix.json), ``refdir cone --max-rank K``, ``refdir select
--selector cosmic`` on a copy of the run folder followed by ``refdir evaluate --intervention ablate`` of
COSMIC's direction on the run's harmful evaluation prompts, and ``refdir audit``. Writes
``beyond-<model>.json`` and prints the tables the README shows. ``--only cosmic,audit`` runs a subset and
reads the others' results from the run folder (their seconds from an earlier ``beyond-<model>.json``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

STAGES = ("monitor", "cone", "cosmic", "audit")


def refdir(*args: str) -> float:
    t = time.time()
    p = subprocess.run([sys.executable, "-m", "refdir.cli", *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"refdir {args[0]} failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
    return round(time.time() - t, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--max-rank", type=int, default=4)
    ap.add_argument("--out", default="results")
    ap.add_argument(
        "--only",
        default=",".join(STAGES),
        help=f"comma-separated subset of {','.join(STAGES)} (the rest read from the run folder)",
    )
    a = ap.parse_args()
    only = set(a.only.split(","))
    if not only <= set(STAGES):
        raise SystemExit(f"--only: unknown stage(s) {sorted(only - set(STAGES))} (use {','.join(STAGES)})")
    run = Path(a.run)
    cfg = json.loads((run / "config.json").read_text())
    model = cfg["model_spec"]
    out = Path(a.out) / f"beyond-{Path(model).name}.json"
    seconds = json.loads(out.read_text())["seconds"] if out.is_file() and only != set(STAGES) else {}
    if "monitor" in only:
        seconds["monitor"] = refdir("monitor", "--run", str(run), "--out", str(run / "monitor_items.json"))
    if "cone" in only:
        seconds["cone"] = refdir(
            "cone", "--run", str(run), "--max-rank", str(a.max_rank), "--out", str(run / "cone.json")
        )
    cosmic = run.parent / f"{run.name}-cosmic"
    ins = json.loads((run / "prompts.json").read_text())["eval_harmful"]
    if "cosmic" in only:
        shutil.rmtree(cosmic, ignore_errors=True)
        shutil.copytree(
            run,
            cosmic,
            ignore=shutil.ignore_patterns(
                "selection.json",
                "direction.*",
                "eval.json",
                "completions.jsonl",
                "cone.*",
                "monitor*",
                "audit",
                "jailbreak*",
                "suffix.json",
                "report.html",
                "*.png",
            ),
        )
        seconds["cosmic_select"] = refdir("select", "--out", str(cosmic), "--selector", "cosmic")
        evh = cosmic / "eval_harmful.json"
        evh.write_text(json.dumps(ins))
        seconds["cosmic_ablation_eval"] = refdir(
            "evaluate",
            "--model",
            model,
            "--direction",
            str(cosmic),
            "--prompts",
            str(evh),
            "--intervention",
            "ablate",
            "--out",
            str(cosmic / "ablate.json"),
        )
    if "audit" in only:
        seconds["audit"] = refdir("audit", "--run", str(run), "--out", str(run / "audit"))
    paper_d = json.loads((run / "direction.json").read_text())
    cosmic_d = json.loads((cosmic / "direction.json").read_text())
    ev = json.loads((run / "eval.json").read_text())
    res = {
        "model": model,
        "seconds": seconds,
        "monitor": json.loads((run / "monitor.json").read_text()),
        "cone": json.loads((run / "cone.json").read_text())["ranks"],
        "selectors": {
            "paper": {
                "layer": paper_d["layer"],
                "pos": paper_d["position"],
                "bypass": paper_d["scores"]["bypass"],
                "induce": paper_d["scores"]["induce"],
                "kl": paper_d["scores"]["kl"],
                "ablation_refusal": ev["refusal"]["harmful"]["ablation"]["refusal_rate"],
                "n": ev["refusal"]["harmful"]["ablation"]["n"],
            },
            "cosmic": {
                "layer": cosmic_d["layer"],
                "pos": cosmic_d["position"],
                "bypass": cosmic_d["scores"]["bypass"],
                "induce": cosmic_d["scores"]["induce"],
                "kl": cosmic_d["scores"]["kl"],
                "ablation_refusal": json.loads((cosmic / "ablate.json").read_text())["refusal_rate"],
                "n": len(ins),
            },
        },
    }
    out.write_text(json.dumps(res, indent=1) + "\n")
    print("| rank | refusal | KL | n | basis |\n|---|---|---|---|---|")
    for r in res["cone"]:
        print(f"| {r['rank']} | {r['refusal_rate']:.2f} | {r['kl']:.3f} | {r['n']} | {r['method']} |")
    print(
        "\n| selector | layer/pos | bypass | induce | KL | ablation refusal (n) |\n|---|---|---|---|---|---|"
    )
    for k, s in res["selectors"].items():
        print(
            f"| {k} | {s['layer']}/{s['pos']} | {s['bypass']:.2f} | {s['induce']:.2f} | {s['kl']:.3f} | "
            f"{s['ablation_refusal']:.2f} ({s['n']}) |"
        )
    m = res["monitor"]
    print(
        f"\nmonitor at layer {m['layer']} (n = {m['n_evaluation']})\n"
        "| read | AUROC | TPR@1%FPR | +GCG flagged |"
        "\n|---|---|---|---|"
    )
    for r, v in m["evaluation"].items():
        g = ((m.get("suffix") or {}).get("flagged") or {}).get(r, {}).get("with_gcg_suffix", "")
        print(f"| {r} | {v['auroc']:.3f} | {v['tpr_at_1pct_fpr']:.2f} | {g} |")
    print("\nseconds: " + json.dumps(seconds))


if __name__ == "__main__":
    main()
