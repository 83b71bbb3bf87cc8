"""The README's results table: `refdir run` with defaults on the paper's data from ../shared/datasets.

Training pools: harmful_train.json / harmless_train.json; harmful eval: JailbreakBench (100);
harmless eval: 100 sampled from harmless_val.json (seed 42). One run folder per model under
runs/results-<model>; the table goes to results/results.md and each summary to results/<model>.json.

    python benchmarks/results.py [--models M ...] [--extra-args "..."] [--judge self]

``--judge SPEC`` adds the second judge (`refdir judge`, on the stored completions) to runs that lack it,
and a second table: each judged condition's substring and judge refusal rates and their agreement.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
MODELS = ["qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"]


def run(model: str, extra: list[str], tag: str, judge: str | None = None) -> dict:
    out = ROOT / "runs" / f"results-{model}{tag}"
    cmd = [
        sys.executable,
        "-m",
        "refdir.cli",
        "run",
        "--model",
        model,
        "--out",
        str(out),
        "--harmful",
        str(SHARED / "harmful_train.json"),
        "--harmless",
        str(SHARED / "harmless_train.json"),
        "--eval-harmful",
        str(SHARED / "jailbreakbench.json"),
        "--eval-harmless",
        str(SHARED / "harmless_val.json"),
        *extra,
    ]
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t
    peak_rss_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # the largest child so far
    if p.returncode != 0:
        msg = (p.stderr.strip().splitlines() or ["?"])[-1]
        return {
            "model": model,
            "ok": False,
            "message": msg,
            "wall_s": round(wall, 1),
            "args": extra,
            "peak_rss_gib": round(peak_rss_gib, 2),
        }
    s = json.loads((out / "summary.json").read_text())
    if judge and not s.get("judge_refusal"):
        p = subprocess.run(
            [sys.executable, "-m", "refdir.cli", "judge", "--run", str(out), "--judge", judge],
            capture_output=True,
            text=True,
        )
        if p.returncode != 0:
            raise SystemExit(f"refdir judge failed on {out}: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
        s = json.loads((out / "summary.json").read_text())
    ev_judge = json.loads((out / "eval.json").read_text()).get("judge") or {}
    prompts = json.loads((out / "prompts.json").read_text())
    stages = json.loads((out / "stages.json").read_text())["stages"]
    return {
        "model": model,
        "ok": True,
        "summary": s,
        "wall_s": round(wall, 1),
        "args": extra,
        "peak_rss_gib": round(peak_rss_gib, 2),
        "stage_seconds": {k: v["seconds"] for k, v in stages.items()},
        "filter": prompts["filter"],
        "refusal_tokens": prompts["refusal_tokens"]["tokens"],
        "metric_threshold": prompts["metric_threshold"],
        "judge": {
            "spec": ev_judge.get("judge"),
            "conditions": {
                c: {
                    "judge_refusal_rate": v["refusal_rate"],
                    "agreement": v["agreement"],
                    "disagreements": len(v["disagreements"]),
                }
                for c, v in ev_judge.get("conditions", {}).items()
            },
        }
        if ev_judge
        else None,
    }


def table(rows: list[dict]) -> str:
    out = [
        "| model | layer/pos | KL (sel.) | harmful: baseline | ablation | ortho | −r "
        "| harmless: baseline | +r "
        "| CE own completions: base → ablated | CE harmless text: base → ablated | stages' time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = r["model"] + (f" `{' '.join(r['args'])}`" if r["args"] else "")
        if not r["ok"]:
            out.append(
                f"| {name} | stopped: {r['message'].replace('|', '/')} | | | | | | | | | | "
                f"{r['wall_s'] / 60:.1f} min |"
            )
            continue
        s = r["summary"]
        h, l, ce = s["harmful_refusal"], s["harmless_refusal"], s["ce_harmless"]
        tx = s.get("ce_harmless_text") or {}
        text = f"{tx['baseline']:.3f} → {tx['ablation']:.3f}" if tx else "not measured"
        out.append(
            f"| {name} | {s['layer']}/{s['pos']} | {s['kl_selection']:.3f} | {h['baseline']:.2f} | "
            f"{h['ablation']:.2f} | {h['ortho']:.2f} | {h['actadd-']:.2f} | {l['baseline']:.2f} | "
            f"{l['actadd+']:.2f} | {ce['baseline']:.3f} → {ce['ablation']:.3f} | {text} | "
            f"{sum(r['stage_seconds'].values()) / 60:.1f} min |"
        )
    return "\n".join(out)


def judge_table(rows: list[dict]) -> str:
    """Second judge vs the substring judge, per judged condition (runs without a judge are left out)."""
    out = [
        "| model | judge | condition | substring refusal | judge refusal | agreement | disagreements |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        j = r.get("judge") if r.get("ok") else None
        if not j:
            continue
        s = r["summary"]
        for cond, v in j["conditions"].items():
            split, name = cond.split("/")
            sub = s[f"{split}_refusal"].get(name)
            out.append(
                f"| {r['model']} | {j['spec']} | {cond} | {sub:.2f} | {v['judge_refusal_rate']:.2f} | "
                f"{v['agreement']:.2f} | {v['disagreements']} |"
            )
    return "\n".join(out) if len(out) > 2 else ""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--extra-args", default="", help="extra `refdir run` arguments for every model")
    ap.add_argument("--tag", default="")
    ap.add_argument("--judge", default=None, help="add this second judge to runs without one (e.g. self)")
    a = ap.parse_args()
    (ROOT / "results").mkdir(exist_ok=True)
    rows = []
    for m in a.models:
        r = run(m, shlex.split(a.extra_args), a.tag, a.judge)
        (ROOT / "results" / f"{m}{a.tag}.json").write_text(json.dumps(r, indent=1) + "\n")
        print(json.dumps(r)[:400], flush=True)
        rows.append(r)
    every = [json.loads(f.read_text()) for f in sorted((ROOT / "results").glob("*.json"))]
    # run summaries only: beyond-/capabilities-/vs_heretic- files hold other tables
    every = [r for r in every if "ok" in r]
    md = table(every)
    jt = judge_table(every)
    if jt:
        md += "\n\nSecond judge (`refdir judge`, the stored completions):\n\n" + jt
    (ROOT / "results" / "results.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
