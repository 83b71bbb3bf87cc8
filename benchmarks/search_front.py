"""refdir search from a cold start, its front against heretic's (a finished vs_heretic result).

    python benchmarks/search_front.py [--model qwen2.5-coder-0.5b-instruct] [--trials 48] \
        [--heretic results/vs_heretic-qwen2.5-coder-0.5b-instruct.json] [--out results/]

1. ``refdir run --stop-after select`` with vs_heretic's data (training pools, JailbreakBench and
   harmless_val as evaluation sets, same seed): screen, candidates, the paper's direction;
2. ``refdir search`` on that folder: trial 0 the paper's direction, ``--trials`` in all, proxy front
   confirmed by greedy generation (``--max-new-tokens`` 64) on the 100 JailbreakBench prompts (substring
   judge) and first-token KL on the 100 harmless evaluation prompts — the sets and judge
   ``benchmarks/vs_heretic.py`` judged heretic's checkpoint with.

heretic is not rerun here (45.7 min + its install): its chosen checkpoint's scores by refdir's judge and
its wall time come from ``--heretic`` (a vs_heretic result JSON); its other trials' points are heretic's
own measurements (its marker judge on its own evaluation prompts) and are marked so. Each stage's wall
time is logged (flushed per line) to ``WORK/search_front.log``; the last stdout line is

    heretic_minutes=… refdir_minutes=… speedup=… heretic_refusal=… heretic_kl=… refdir_refusal=…
    refdir_kl=… heretic_front_dominated=K/N

``refdir_minutes``: cold start to the confirmation of the first trial (by number) that dominates or
equals heretic's chosen point with KL <= 0.1: run stages + proxy seconds of trials up to it + the whole
confirmation pass (conservative: the confirmation of every front trial).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
KL_LIMIT = 0.1


def log(work: Path, msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    with (work / "search_front.log").open("a") as f:
        f.write(line + "\n")


def timed(cmd: list[str], work: Path, name: str) -> float:
    log(work, "$ " + " ".join(cmd[2:]))
    t0 = time.perf_counter()
    with (work / f"{name}.log").open("w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"{name} failed (exit {rc}); see {work / (name + '.log')}")
    log(work, f"{name}: {wall:.1f} s")
    return wall


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """``a`` dominates or equals ``b`` (both minimized)."""
    return a[0] <= b[0] and a[1] <= b[1]


def heretic_points(h: dict) -> tuple[tuple[float, float], list[dict], float]:
    """heretic's chosen point (refdir's judge), its trials' own points, its wall minutes."""
    chosen = (h["judge"]["heretic"]["refusal_substring"], h["judge"]["heretic"]["kl_first"])
    n_bad = h["heretic"].get("n_bad_prompts") or 100
    pts = [
        {"refusal": t["refusals"] / n_bad, "kl": t["kl"], "label": f"heretic trial {t['index']}"}
        for t in h["heretic"]["trials"]
    ]
    return chosen, pts, h["heretic"]["wall_s"] / 60


def base_result(a: argparse.Namespace, front: dict, run_s: float, search_s: float) -> dict:
    """What both comparisons record: timings, the fronts and every confirmed trial with its proxy."""
    return {
        "model": a.model,
        "run_s": run_s,
        "search_s": search_s,
        "front": {k: front[k] for k in ("front", "confirmed_front", "timing", "settings")},
        "confirmed": [
            {"number": t["number"], "params": t["params"], "proxy": t["proxy"], **t["confirmed"]}
            for t in front["trials"]
            if t["confirmed"]
        ],
    }


def vs_paper(a: argparse.Namespace, work: Path, front: dict, run_s: float, search_s: float) -> None:
    """No other tool: the front beside the paper's direction (trial 0) — the confirmed trial with the
    paper's refusal or less at the lowest KL."""
    from refdir.core.io import write_json
    from refdir.outputs.front_plot import save_front_png

    conf = {t["number"]: t for t in front["trials"] if t["confirmed"]}
    paper = conf[0]["confirmed"]
    better = [t for n, t in conf.items() if n != 0 and t["confirmed"]["refusal"] <= paper["refusal"]]
    best = min(better, key=lambda t: t["confirmed"]["kl"]) if better else None
    timing = front["timing"]
    line = f"paper_refusal={paper['refusal']:.2f} paper_kl={paper['kl']:.4f} " + (
        f"refdir_trial={best['number']} refdir_refusal={best['confirmed']['refusal']:.2f} "
        f"refdir_kl={best['confirmed']['kl']:.4f} kl_ratio={best['confirmed']['kl'] / paper['kl']:.2f} "
        if best
        else "refdir_trial=none "
    )
    line += (
        f"trials={len(front['trials'])} proxy_trials_per_min={timing['proxy_trials_per_min']} "
        f"confirmed_trials_per_min={timing['confirmed_trials_per_min']} minutes={(run_s + search_s) / 60:.1f}"
    )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    save_front_png(front, out / f"search_front-{a.model}.png")
    result = {
        **base_result(a, front, run_s, search_s),
        "line": line,
    }
    write_json(out / f"search_front-{a.model}.json", result)
    for n, t in conf.items():
        c = t["confirmed"]
        log(work, f"trial {n:3d} refusal {c['refusal']:.2f} KL {c['kl']:.4f} params {t['params']}")
    log(work, line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--trials", type=int, default=48)
    ap.add_argument("--batch-trials", type=int, default=8)
    ap.add_argument("--confirm", type=int, default=6)
    ap.add_argument("--confirm-max-refusal", default=None, help="passed to refdir search")
    ap.add_argument("--n-proxy", type=int, default=16, help="validation prompts per side for the proxy")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument(
        "--heretic",
        default=str(ROOT / "results" / f"vs_heretic-{DEFAULT_MODEL}.json"),
        help="a vs_heretic result JSON, or none: the front beside the paper's direction only",
    )
    ap.add_argument("--shared", default=str(SHARED))
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default=str(ROOT / "results"))
    ap.add_argument("--reuse-run", action="store_true", help="keep WORK/run if it exists (not cold)")
    ap.add_argument("--refdir-args", default="--induce-threshold=-1e9")
    a = ap.parse_args()
    work = Path(a.work or ROOT / "runs" / f"search_front-{a.model}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    run = work / "run"
    s = Path(a.shared)
    exe = [sys.executable, "-m", "refdir.cli"]
    run_s = 0.0
    if a.reuse_run and (run / "direction.json").exists():  # its stages' own seconds count as cold start
        stages = json.loads((run / "stages.json").read_text())["stages"]
        run_s = sum(v["seconds"] for v in stages.values())
        log(work, f"reusing {run}: its stages took {run_s:.1f} s")
    else:
        shutil.rmtree(run, ignore_errors=True)
        cmd = exe + ["run", "--model", a.model, "--out", str(run), "--harmful", str(s / "harmful_train.json")]
        cmd += [
            "--harmless",
            str(s / "harmless_train.json"),
            "--eval-harmful",
            str(s / "jailbreakbench.json"),
        ]
        cmd += ["--eval-harmless", str(s / "harmless_val.json"), "--stop-after", "select"]
        run_s = timed(cmd + a.refdir_args.split(), work, "run")
    for f in ("search_trials.jsonl", "front.json"):
        (run / f).unlink(missing_ok=True)
    cmd = exe + [
        "search",
        "--run",
        str(run),
        "--trials",
        str(a.trials),
        "--batch-trials",
        str(a.batch_trials),
    ]
    cmd += [
        "--confirm",
        str(a.confirm),
        "--max-new-tokens",
        str(a.max_new_tokens),
        "--n-proxy",
        str(a.n_proxy),
    ]
    if a.confirm_max_refusal is not None:
        cmd += ["--confirm-max-refusal", str(a.confirm_max_refusal)]
    search_s = timed(cmd, work, "search")
    front = json.loads((run / "front.json").read_text())
    if a.heretic == "none":
        return vs_paper(a, work, front, run_s, search_s)
    h = json.loads(Path(a.heretic).read_text())
    chosen, h_pts, h_min = heretic_points(h)
    trials = front["trials"]
    conf = [t for t in trials if t["confirmed"]]
    cum = 0.0
    reach = None
    for t in trials:
        cum += t["seconds"]
        c = t["confirmed"]
        if c and c["kl"] <= KL_LIMIT and dominates((c["refusal"], c["kl"]), chosen):
            reach = (t, cum)
            break
    confirm_s = front["timing"]["confirm_s"]
    conf_pts = [(t["confirmed"]["refusal"], t["confirmed"]["kl"]) for t in conf]
    dominated = sum(any(dominates(p, (q["refusal"], q["kl"])) for p in conf_pts) for q in h_pts)
    front["compare"] = [
        {"name": "heretic", "points": h_pts, "chosen": {"refusal": chosen[0], "kl": chosen[1]}}
    ]
    from refdir.core.io import write_json
    from refdir.outputs.front_plot import save_front_png

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    save_front_png(front, out / f"search_front-{a.model}.png")
    if reach is None:  # the lowest refusal within heretic's KL limit
        ok = [t for t in conf if t["confirmed"]["kl"] <= KL_LIMIT] or conf
        best = min(ok, key=lambda t: (t["confirmed"]["refusal"], t["confirmed"]["kl"]))
        r_min, pt = (run_s + search_s) / 60, best["confirmed"]
    else:
        r_min, pt = (run_s + reach[1] + confirm_s) / 60, reach[0]["confirmed"]
    line = (
        f"heretic_minutes={h_min:.2f} refdir_minutes={r_min:.2f} speedup={h_min / r_min:.2f} "
        f"heretic_refusal={chosen[0]:.2f} heretic_kl={chosen[1]:.4f} refdir_refusal={pt['refusal']:.2f} "
        f"refdir_kl={pt['kl']:.4f} heretic_front_dominated={dominated}/{len(h_pts)}"
        + ("" if reach else " (no refdir point dominates heretic's chosen one: refdir's best shown)")
    )
    result = {
        **base_result(a, front, run_s, search_s),
        "reached": None
        if reach is None
        else {
            "trial": reach[0]["number"],
            "minutes": r_min,
            # the same, had only that trial been confirmed (its share of the batched confirmation)
            "minutes_own_confirmation": (run_s + reach[1] + reach[0]["confirmed"]["seconds"]) / 60,
        },
        "heretic": {"chosen": chosen, "points": h_pts, "minutes": h_min, "source": a.heretic},
        "line": line,
    }
    write_json(out / f"search_front-{a.model}.json", result)
    for t in conf:
        c = t["confirmed"]
        log(
            work,
            f"trial {t['number']:3d} refusal {c['refusal']:.2f} KL {c['kl']:.4f} "
            f"(proxy {t['proxy']['refusal']:.3f} / {t['proxy']['kl']:.4f}) params {t['params']}",
        )
    log(work, line)


if __name__ == "__main__":
    main()
