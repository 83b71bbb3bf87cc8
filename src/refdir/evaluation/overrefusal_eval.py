"""Evaluation of the false-refusal ablation (Wang et al. 2025): does ablating the false-refusal direction
stop refusals of safe prompts (XSTest's safe set, never used to find the direction) while harmful prompts
are still refused, and at what cost on harmless prompts?

Greedy completions, in shared batches (:func:`~refdir.evaluation.conditions.generate_conditions`), of
XSTest's safe prompts under baseline, refusal-direction ablation and false-refusal ablation, and of the
run's harmful evaluation prompts under false-refusal ablation (the baselines, and XSTest under the refusal
direction's ablation, are the run's own completions when ``completions.jsonl`` holds them for the same
prompts, length and direction); refusal rates by the substring judge and, when
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


# job -> the run's (split, condition) in completions.jsonl that already holds it; ablation only when the
# run's evaluation ablated the same refusal direction
RUN_ROWS = {
    f"{HARMFUL}/baseline": ("harmful", "baseline"),
    f"{XSTEST}/baseline": ("xstest-safe", "baseline"),
    f"{XSTEST}/refusal_ablation": ("xstest-safe", "ablation"),
}
REUSED = "the run's completions.jsonl"


def reusable_completions(
    completions: Path, eval_json: Path, prompts: EvalPrompts, max_new_tokens: int, refusal: Direction
) -> dict[str, list[str]]:
    """The completions of every job of :data:`RUN_ROWS` that the run's evaluation already generated: same
    prompts in the same order, same ``max_new_tokens`` and, for the ablation, the same direction (layer,
    position). Jobs not found are generated again."""
    if not completions.is_file() or not eval_json.is_file():
        return {}
    ev = json.loads(eval_json.read_text())
    if ev.get("max_new_tokens") != max_new_tokens:
        return {}
    d = ev.get("direction") or {}
    same_direction = (d.get("layer"), d.get("pos")) == (refusal.layer, refusal.pos)
    rows = [json.loads(line) for line in completions.read_text().splitlines() if line.strip()]
    out = {}
    for job, (split, cond) in RUN_ROWS.items():
        if cond == "ablation" and not same_direction:
            continue
        got = [r for r in rows if r.get("split") == split and r.get("condition") == cond]
        want = _prompts_of(prompts, job.split("/")[0])[0]
        if got and [r["prompt"] for r in got] == want:
            out[job] = [r["completion"] for r in got]
    return out


def _prompts_of(p: EvalPrompts, split: str) -> tuple[list[str], list[str | None]]:
    """The texts and categories of a job's split (XSTest safe or the run's harmful prompts)."""
    return (p.xstest, p.xstest_categories) if split == XSTEST else (p.harmful, p.harmful_categories)


def _jobs(p: EvalPrompts, fr: torch.Tensor, reused: set[str]) -> list[GenJob]:
    """The generation jobs not in ``reused``; ``fr``: the false-refusal vector ``[d]``."""
    out = []
    for split, cond in JOBS:
        if f"{split}/{cond}" in reused:
            continue
        texts, cats = _prompts_of(p, split)
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
    reused: dict[str, list[str]] | None = None,
    judge: str | None = None,
) -> tuple[dict, list[dict]]:
    """The numbers (for ``overrefusal.json``) and the completions (``overrefusal_completions.jsonl`` rows):
    refusal rates per split and condition (substring judge, and ``judge`` when given), first-token KL on
    the harmless prompts under each ablation. ``reused``: completions of jobs the run already generated
    (:func:`reusable_completions`); the other jobs are generated, in shared batches."""
    model, tok = rt.model, rt.tokenizer
    reused = reused or {}
    jobs = _jobs(prompts, false_refusal.vector, set(reused))
    judged = generate_conditions(model, tok, jobs, refusal, rt.fmt, max_new_tokens, rt.batch.gen_rows)
    for job, texts in reused.items():
        ps, cats = _prompts_of(prompts, job.split("/")[0])
        judged[job] = [Judged(p, c, is_refusal(c), cat) for p, c, cat in zip(ps, texts, cats, strict=True)]
    refusal_table: dict[str, dict] = {}
    rows = []
    for split, cond in JOBS:
        items = judged[f"{split}/{cond}"]
        entry = {"refusal_rate": refusal_rate(items), "n": len(items), "per_category": per_category(items)}
        if f"{split}/{cond}" in reused:
            entry["from"] = REUSED
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
