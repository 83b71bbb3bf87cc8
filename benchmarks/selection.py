"""Selection speed: a faithful reference-style loop vs refdir, same model, candidates and prompts.

The reference implementation (Arditi et al.'s code) scores one candidate at a time with three
separate sweeps — KL (harmless, ablated), bypass (harmful, ablated), induce (harmless, +r) — each
a full forward pass returning full-vocabulary logits at every position. refdir scores many
candidates per pass, unembeds only the last position, orders candidates with a one-backward-pass
linear screen and computes induce on a cached prefix.

    python benchmarks/selection.py [--model M] [--run RUNFOLDER]

Both methods run in this process on the same candidates (from RUNFOLDER, computed with
``refdir run --stop-after extract`` if absent) and validation prompts. Last line:
``selection_speedup=9.3 same_choice=true``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from refdir.interventions import activation_addition, directional_ablation
from refdir.io import load_tensors
from refdir.models import load_model
from refdir.pipeline import RunConfig, run_pipeline
from refdir.refusal import position_ids, refusal_metric
from refdir.selection import SelectionConfig, select_direction
from refdir.templates import tokenize_prompts

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


@torch.no_grad()
def reference_scores(model, candidates, hv, lv, ids, batch_size: int = 32, only=None):
    """One candidate at a time, three sweeps, full logits everywhere (as the reference code does)."""
    def full_logits(b):
        outs = []
        for i in range(0, b.input_ids.shape[0], batch_size):
            ii, mm = b.input_ids[i:i + batch_size], b.attention_mask[i:i + batch_size]
            outs.append(model(input_ids=ii, attention_mask=mm, position_ids=position_ids(mm)).logits[:, -1].float())
        return torch.cat(outs)

    base_logp = torch.log_softmax(full_logits(lv).double(), -1)
    P, L, _ = candidates.shape
    scores = {k: torch.full((P, L), float("nan")) for k in ("bypass", "induce", "kl")}
    for layer in range(L):
        for p in range(P):
            if only is not None and (p, layer) not in only:
                continue
            r = candidates[p, layer]
            if float(r.norm()) == 0:
                continue
            with directional_ablation(model, r):
                logp = torch.log_softmax(full_logits(lv).double(), -1)
            scores["kl"][p, layer] = float((base_logp.exp() * (base_logp - logp)).sum(-1).mean())
            with directional_ablation(model, r):
                scores["bypass"][p, layer] = float(refusal_metric(full_logits(hv), ids).mean())
            with activation_addition(model, r, layer):
                scores["induce"][p, layer] = float(refusal_metric(full_logits(lv), ids).mean())
    return scores


def reference_choice(scores, L: int, kl_thr: float, induce_thr: float):
    best, val = None, math.inf
    P = scores["bypass"].shape[0]
    for p in range(P):
        for layer in range(int(0.8 * L)):
            b, k, i = (float(scores[x][p, layer]) for x in ("bypass", "kl", "induce"))
            if math.isnan(b) or not k < kl_thr or not i > induce_thr:
                continue
            if b < val:
                best, val = (p, layer), b
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--run", default=None, help="run folder holding prompts.json and candidates.safetensors")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--reference-sample", type=int, default=None,
                    help="time the reference loop on this many random candidates and extrapolate; same_choice "
                         "is then checked against refdir's unpruned scoring of every eligible candidate, whose "
                         "scores are compared with the reference loop's on the sampled candidates")
    ap.add_argument("--induce-threshold", type=float, default=None,
                    help="default: the model's calibrated threshold from prompts.json")
    a = ap.parse_args()
    model, tok = load_model(a.model)
    run = Path(a.run or f"runs/bench-{a.model}")
    cfg = RunConfig(model=a.model)
    if SHARED.exists():
        cfg.harmful, cfg.harmless = str(SHARED / "harmful_train.json"), str(SHARED / "harmless_train.json")
    if not ((run / "prompts.json").exists() and (run / "candidates.safetensors").exists()):
        run_pipeline(cfg, run, model, tok, stop_after="extract", log=lambda m: print(m, flush=True))
    data = json.loads((run / "prompts.json").read_text())
    cands = load_tensors(run / "candidates.safetensors")["directions"]
    hv = tokenize_prompts(tok, [x["instruction"] for x in data["harmful_val"]])
    lv = tokenize_prompts(tok, [x["instruction"] for x in data["harmless_val"]])
    ids = torch.tensor(data["refusal_tokens"]["token_ids"])
    thr = a.induce_threshold if a.induce_threshold is not None else data.get("metric_threshold", 0.0)
    sel_cfg = SelectionConfig(induce_threshold=thr)
    print(f"model {a.model}: {cands.shape[0]}x{cands.shape[1]} candidates, {len(data['harmful_val'])}+"
          f"{len(data['harmless_val'])} validation prompts, threads {torch.get_num_threads()}", flush=True)

    t = time.time()
    res = select_direction(model, cands, hv, lv, ids.tolist(), sel_cfg)
    t_refdir = time.time() - t
    print(f"refdir selection: {t_refdir:.1f} s, chosen {res.chosen}", flush=True)
    if a.skip_reference:
        return
    n_all = cands.shape[0] * cands.shape[1]
    only = None
    if a.reference_sample:
        g = torch.Generator().manual_seed(0)
        idx = torch.randperm(n_all, generator=g)[: a.reference_sample].tolist()
        only = {(i % cands.shape[0], i // cands.shape[0]) for i in idx}
    t = time.time()
    ref = reference_scores(model, cands, hv, lv, ids, only=only)
    t_ref = time.time() - t
    per = t_ref / (len(only) if only else n_all)
    if only:
        t_ref = per * n_all
        print(f"reference loop: {per:.2f} s per candidate on {len(only)} sampled candidates -> {t_ref:.0f} s "
              f"extrapolated to all {n_all}", flush=True)
        t = time.time()
        full = select_direction(model, cands, hv, lv, ids.tolist(), SelectionConfig(**{**sel_cfg.to_json(), "prune": False}))
        print(f"refdir without pruning (every eligible candidate): {time.time() - t:.1f} s, chosen {full.chosen}",
              flush=True)
        diffs = {}
        for k in ("bypass", "induce", "kl"):
            both = [(float(ref[k][c]), float(getattr(full, k)[c])) for c in only]
            diffs[k] = max([abs(x - y) for x, y in both if not (math.isnan(x) or math.isnan(y))], default=float("nan"))
        print("reference vs refdir scores on the sampled candidates, max |diff|: "
              + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()), flush=True)
        same = full.chosen == res.chosen
        print(f"selection_speedup={t_ref / t_refdir:.1f} same_choice={'true' if same else 'false'} "
              f"same_choice_basis=unpruned_refdir score_max_diff={max(diffs.values()):.1e}")
        return
    choice = reference_choice(ref, cands.shape[1], sel_cfg.kl_threshold, thr)
    print(f"reference loop: {t_ref:.1f} s ({per:.2f} s per candidate), chosen {choice}", flush=True)
    same = choice == (tuple(res.chosen) if res.chosen else None)
    print(f"selection_speedup={t_ref / t_refdir:.1f} same_choice={'true' if same else 'false'}")


if __name__ == "__main__":
    main()
