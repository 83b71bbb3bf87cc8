"""Selection speed: a faithful reference-style loop vs refdir, same model, candidates and prompts.

The reference implementation (Arditi et al.'s code) scores one candidate at a time with three
separate sweeps — KL (harmless, ablated), bypass (harmful, ablated), induce (harmless, +r) — each
a full forward pass returning full-vocabulary logits at every position. refdir scores many
candidates per pass, unembeds only the last position, orders candidates with a one-backward-pass
linear screen and computes induce on a cached prefix.

    python benchmarks/selection.py [--model M] [--run RUNFOLDER] [--reference-lazy]

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

from refdir.core.io import load_tensors
from refdir.core.models import load_model
from refdir.core.templates import tokenize_prompts
from refdir.method.interventions import activation_addition, directional_ablation
from refdir.method.refusal import position_ids, refusal_metric
from refdir.method.selection import SelectionConfig, select_direction
from refdir.run.pipeline import RunConfig, run_pipeline

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


class ReferenceLoop:
    """One candidate at a time, three sweeps, full logits everywhere (as the reference code does)."""

    def __init__(self, model, hv, lv, ids, batch_size: int = 32):
        self.model, self.hv, self.lv, self.ids, self.bs = model, hv, lv, ids, batch_size
        self.seconds = {"kl": 0.0, "bypass": 0.0, "induce": 0.0}
        self.calls = {"kl": 0, "bypass": 0, "induce": 0}
        self.base_logp = torch.log_softmax(self.full_logits(lv).double(), -1)

    @torch.no_grad()
    def full_logits(self, b):
        outs = []
        for i in range(0, b.input_ids.shape[0], self.bs):
            ii, mm = b.input_ids[i : i + self.bs], b.attention_mask[i : i + self.bs]
            outs.append(
                self.model(input_ids=ii, attention_mask=mm, position_ids=position_ids(mm))
                .logits[:, -1]
                .float()
            )
        return torch.cat(outs)

    def sweep(self, kind: str, r: torch.Tensor, layer: int) -> float:
        t = time.time()
        if kind == "kl":
            with directional_ablation(self.model, r):
                logp = torch.log_softmax(self.full_logits(self.lv).double(), -1)
            v = float((self.base_logp.exp() * (self.base_logp - logp)).sum(-1).mean())
        elif kind == "bypass":
            with directional_ablation(self.model, r):
                v = float(refusal_metric(self.full_logits(self.hv), self.ids).mean())
        else:
            with activation_addition(self.model, r, layer):
                v = float(refusal_metric(self.full_logits(self.lv), self.ids).mean())
        self.seconds[kind] += time.time() - t
        self.calls[kind] += 1
        return v

    def per_candidate(self) -> float:
        """Measured seconds of the three sweeps of one candidate (mean per sweep kind, summed)."""
        return sum(self.seconds[k] / max(self.calls[k], 1) for k in self.seconds)


def reference_scores(loop: ReferenceLoop, candidates):
    """Every sweep for every candidate: the reference code's whole loop."""
    P, L, _ = candidates.shape
    scores = {k: torch.full((P, L), float("nan")) for k in ("bypass", "induce", "kl")}
    for layer in range(L):
        for p in range(P):
            r = candidates[p, layer]
            if float(r.norm()) == 0:
                continue
            for kind in ("kl", "bypass", "induce"):
                scores[kind][p, layer] = loop.sweep(kind, r, layer)
    return scores


def reference_choice_lazy(loop: ReferenceLoop, candidates, kl_thr: float, induce_thr: float):
    """The reference loop's choice, exactly, with fewer sweeps.

    The reference chooses the lowest bypass among eligible candidates (layer < 80%) passing KL and
    induce. So: the bypass sweep for every eligible candidate, then KL and induce in increasing
    bypass order until one passes; every candidate with lower bypass failed a filter and every other
    one has higher bypass. Each sweep is the reference's own full-logits forward pass."""
    P, L, _ = candidates.shape
    eligible = [
        (p, layer)
        for layer in range(int(0.8 * L))
        for p in range(P)
        if float(candidates[p, layer].norm()) > 0
    ]
    bypass = {c: loop.sweep("bypass", candidates[c], c[1]) for c in eligible}
    for c in sorted(eligible, key=lambda c: bypass[c]):
        if (
            loop.sweep("kl", candidates[c], c[1]) < kl_thr
            and loop.sweep("induce", candidates[c], c[1]) > induce_thr
        ):
            return c, len(eligible)
    return None, len(eligible)


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
    ap.add_argument(
        "--reference-lazy",
        action="store_true",
        help="run only the reference sweeps that decide its choice (every bypass sweep, then KL "
        "and induce in bypass order until one passes) and extrapolate its time from the "
        "measured cost of each sweep; the choice is still the full loop's, exactly",
    )
    ap.add_argument(
        "--induce-threshold",
        type=float,
        default=None,
        help="default: the model's calibrated threshold from prompts.json",
    )
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
    print(
        f"model {a.model}: {cands.shape[0]}x{cands.shape[1]} candidates, {len(data['harmful_val'])}+"
        f"{len(data['harmless_val'])} validation prompts, threads {torch.get_num_threads()}",
        flush=True,
    )

    t = time.time()
    res = select_direction(model, cands, hv, lv, ids.tolist(), sel_cfg)
    t_refdir = time.time() - t
    print(f"refdir selection: {t_refdir:.1f} s, chosen {res.chosen}", flush=True)
    if a.skip_reference:
        return
    n_all = cands.shape[0] * cands.shape[1]
    loop = ReferenceLoop(model, hv, lv, ids)
    if a.reference_lazy:  # reference time from the measured sweep costs; its choice computed exactly
        choice, n_elig = reference_choice_lazy(loop, cands, sel_cfg.kl_threshold, thr)
        t_ref = loop.per_candidate() * n_all
        print(
            f"reference loop: {loop.per_candidate():.2f} s per candidate (sweeps: "
            + ", ".join(
                f"{k} {loop.calls[k]} x {loop.seconds[k] / max(loop.calls[k], 1):.2f} s" for k in loop.calls
            )
            + f") -> {t_ref:.0f} s for all {n_all} candidates; its choice {choice} (bypass of all {n_elig} "
            "eligible, then KL and induce in bypass order until one passes)",
            flush=True,
        )
    else:
        t = time.time()
        ref = reference_scores(loop, cands)
        t_ref = time.time() - t
        choice = reference_choice(ref, cands.shape[1], sel_cfg.kl_threshold, thr)
        print(
            f"reference loop: {t_ref:.1f} s ({t_ref / n_all:.2f} s per candidate), chosen {choice}",
            flush=True,
        )
    same = choice == (tuple(res.chosen) if res.chosen else None)
    print(f"selection_speedup={t_ref / t_refdir:.1f} same_choice={'true' if same else 'false'}")


if __name__ == "__main__":
    main()
