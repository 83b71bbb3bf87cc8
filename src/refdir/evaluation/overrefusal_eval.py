"""Evaluation of the false-refusal ablation (Wang et al. 2025): does ablating the false-refusal direction
stop refusals of safe prompts (XSTest's safe set, never used to find the direction) while harmful prompts
are still refused, and at what cost on harmless prompts?

Greedy completions, in shared batches (:func:`~refdir.evaluation.conditions.generate_conditions`), of
XSTest's safe prompts under baseline, refusal-direction ablation and false-refusal ablation, and of the
run's harmful evaluation prompts under false-refusal ablation (their baseline is the run's own completions
when ``completions.jsonl`` holds them at the same length); refusal rates by the substring judge and, when
asked, a second judge; first-token KL on the run's harmless evaluation prompts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from refdir.core.prefix import last_logits_shared, split_prefix
from refdir.core.runtime import Runtime
from refdir.evaluation.conditions import (
    GenJob,
    Judged,
    completion_rows,
    generate_conditions,
    per_category,
    refusal_rate,
)
from refdir.method.directions import Direction
from refdir.method.interventions import directional_ablation
from refdir.method.refusal import REFUSAL_PHRASES, is_refusal
from refdir.method.selection import kl_divergence

# job name -> (split, condition); a refusing job next to an answering one keeps batches wide
XSTEST, HARMFUL = "xstest_safe", "harmful"
JOBS = (
    (HARMFUL, "false_refusal_ablation"),
    (XSTEST, "refusal_ablation"),
    (XSTEST, "baseline"),
    (XSTEST, "false_refusal_ablation"),
    (HARMFUL, "baseline"),
)


@dataclass
class EvalPrompts:
    """What the evaluation runs on: XSTest safe prompts (texts, categories), the run's harmful evaluation
    prompts (texts, categories) and its harmless evaluation prompts (texts)."""

    xstest: list[str]
    xstest_categories: list[str | None]
    harmful: list[str]
    harmful_categories: list[str | None]
    harmless: list[str]


def reusable_baseline(
    completions: Path, prompts: list[str], max_new_tokens: int, eval_json: Path
) -> list[str]:
    """The run's harmful baseline completions, when ``completions.jsonl`` holds them for exactly these
    prompts at the same ``max_new_tokens`` (else []: they are generated again)."""
    if not completions.is_file() or not eval_json.is_file():
        return []
    if json.loads(eval_json.read_text()).get("max_new_tokens") != max_new_tokens:
        return []
    rows = [json.loads(line) for line in completions.read_text().splitlines() if line.strip()]
    base = [r for r in rows if r.get("split") == "harmful" and r.get("condition") == "baseline"]
    if [r["prompt"] for r in base] != prompts:
        return []
    return [r["completion"] for r in base]


def _jobs(p: EvalPrompts, fr: torch.Tensor, reuse: bool) -> list[GenJob]:
    """The generation jobs; ``fr``: the false-refusal vector ``[d]`` (the run's direction is the default)."""
    out = []
    for split, cond in JOBS:
        if split == HARMFUL and cond == "baseline" and reuse:
            continue
        texts, cats = (
            (p.xstest, p.xstest_categories) if split == XSTEST else (p.harmful, p.harmful_categories)
        )
        mode = "baseline" if cond == "baseline" else "ablation"
        out.append(GenJob(f"{split}/{cond}", mode, texts, cats, fr if cond.startswith("false") else None))
    return out


@torch.no_grad()
def first_token_kl(model, batch, directions: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean KL(baseline || ablated) of the next-token distribution per direction ``[d]``."""
    pb = split_prefix(batch, True, model)
    base_logp = torch.log_softmax(last_logits_shared(model, pb).double(), -1)  # [N, V]
    out = {}
    for name, v in directions.items():
        with directional_ablation(model, v):
            out[name] = round(float(kl_divergence(base_logp, last_logits_shared(model, pb)).mean()), 6)
    return out


def second_judge_rates(spec: str, rt: Runtime, judged: dict[str, list[Judged]]) -> dict:
    """Refusal rate per job by the judge ``spec`` (:func:`refdir.evaluation.verdicts.make_judge`), or why it
    was skipped (that module absent)."""
    try:
        from refdir.evaluation.verdicts import make_judge
    except ImportError:
        return {"spec": spec, "skipped": "refdir.evaluation.verdicts is not available"}
    judge = make_judge(spec, rt.model, rt.tokenizer, rt.fmt)
    rates = {}
    for name, items in judged.items():
        v = judge.verdicts([j.prompt for j in items], [j.completion for j in items])
        rates[name] = {"refusal_rate": sum(x.refusal for x in v) / max(len(v), 1), "n": len(v)}
    return {"spec": spec, "name": getattr(judge, "name", spec), "refusal": rates}


def evaluate_false_refusal(
    rt: Runtime,
    refusal: Direction,
    false_refusal: Direction,
    prompts: EvalPrompts,
    max_new_tokens: int,
    baseline_harmful: list[str] | None = None,
    judge: str | None = None,
) -> tuple[dict, list[dict]]:
    """The numbers (for ``overrefusal.json``) and the completions (``overrefusal_completions.jsonl`` rows):
    refusal rates per split and condition (substring judge, and ``judge`` when given), first-token KL on
    the harmless prompts under each ablation. ``baseline_harmful``: the run's harmful baseline completions
    (:func:`reusable_baseline`), generated again when None or empty."""
    model, tok = rt.model, rt.tokenizer
    reuse = bool(baseline_harmful)
    jobs = _jobs(prompts, false_refusal.vector, reuse)
    judged = generate_conditions(model, tok, jobs, refusal, rt.fmt, max_new_tokens, rt.batch.gen_rows)
    if reuse:
        judged[f"{HARMFUL}/baseline"] = [
            Judged(p, c, is_refusal(c), cat)
            for p, c, cat in zip(prompts.harmful, baseline_harmful or [], prompts.harmful_categories)
        ]
    refusal_table: dict[str, dict] = {}
    rows = []
    for split, cond in JOBS:
        items = judged[f"{split}/{cond}"]
        entry = {"refusal_rate": refusal_rate(items), "n": len(items), "per_category": per_category(items)}
        if reuse and split == HARMFUL and cond == "baseline":
            entry["from"] = "the run's completions.jsonl"
        refusal_table.setdefault(split, {})[cond] = entry
        rows += completion_rows(split, cond, items)
    ev = {
        "refusal": refusal_table,
        "judge": second_judge_rates(judge, rt, judged) if judge else None,
        "kl_harmless_first": first_token_kl(
            model,
            rt.encode(prompts.harmless),
            {"refusal_ablation": refusal.vector, "false_refusal_ablation": false_refusal.vector},
        ),
        "n_harmless": len(prompts.harmless),
        "max_new_tokens": max_new_tokens,
        "refusal_judge": "substring (paper)",
        "refusal_phrases": list(REFUSAL_PHRASES),
    }
    return ev, rows
