"""Scores of many edits at once: a first-token proxy for the search, generation + judge to confirm.

Proxy (one forward pass per prompt per trial, many trials per pass): *soft refusal* — the mean over
harmful prompts of ``sigmoid(m - τ)``, where ``m`` is the paper's first-token refusal log-odds and ``τ``
the threshold the run's screen calibrated against the model's own generations (so it reads as a refusal
rate, smooth enough for TPE) — and first-token KL(base || edited) on harmless prompts, heretic's damage
measure. Confirmation: greedy completions of the evaluation prompts under each trial's hooks, judged by
the substring judge (and any phrase list given), and the first-token KL on the evaluation harmless set.
Rows of different trials share batches (:class:`~refdir.method.weighted.TrialRows`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from refdir.core.adapter import get_adapter
from refdir.core.prefix import last_logits_shared, per_trial_last_logits, split_prefix
from refdir.core.prompt_format import PromptFormat
from refdir.core.templates import tokenize_prompts
from refdir.core.types import Model, Tokenizer
from refdir.method.refusal import REFUSAL_PHRASES, generate_batch, is_refusal, length_order, refusal_metric
from refdir.method.selection import concat_batches, kl_divergence
from refdir.method.weighted import TrialRows, WeightedAblation


def trial_groups(model: Model, edits: list[WeightedAblation]) -> list[tuple[TrialRows, list[int]]]:
    """Per-row hooks serving the edits (their indices): one :class:`TrialRows` for all of them, or one per
    edit where per-row hooks cannot serve them (norm-preserving edits on MoE writers see tokens, not
    rows)."""
    one = torch.zeros(1, dtype=torch.long)
    if get_adapter(model).is_moe and any(e.norm != "none" for e in edits) and len(edits) > 1:
        return [(TrialRows(model, [e], one), [i]) for i, e in enumerate(edits)]
    return [(TrialRows(model, edits, one), list(range(len(edits))))]


def _last_logits(model: Model, pb, edits: list[WeightedAblation], batch_rows: int) -> torch.Tensor:
    """``[K, n, V]`` last-position logits of every prompt under every edit."""
    parts = [
        per_trial_last_logits(model, pb, len(idx), batch_rows, rows.serving)
        for rows, idx in trial_groups(model, edits)
    ]
    return torch.cat(parts)


class ProxyScorer:
    """First-token proxies (soft refusal, KL) of many edits on fixed prompts; baselines computed once."""

    def __init__(
        self,
        model: Model,
        tokenizer: Tokenizer,
        fmt: PromptFormat,
        harmful: list[str],
        harmless: list[str],
        refusal_ids: list[int],
        threshold: float,
        batch_rows: int = 64,
    ):
        self.model, self.batch_rows, self.threshold = model, batch_rows, threshold
        dev = get_adapter(model).device
        hb = tokenize_prompts(tokenizer, harmful, fmt, dev)
        lb = tokenize_prompts(tokenizer, harmless, fmt, dev)
        self.n_harm = len(harmful)
        self.ids = torch.tensor(refusal_ids)
        self.p_both = split_prefix(concat_batches(hb, lb), True, model)
        with torch.no_grad():
            base = last_logits_shared(model, split_prefix(lb, True, model))  # [n, V]
        self.base_logp = torch.log_softmax(base.double(), -1)

    @torch.no_grad()
    def score(self, edits: list[WeightedAblation]) -> list[dict[str, float]]:
        """``{"refusal", "kl", "refusal_logodds"}`` per edit, in order."""
        logits = _last_logits(self.model, self.p_both, edits, self.batch_rows)  # [K, Nh + Nl, V]
        out = []
        for x in logits:
            m = refusal_metric(x[: self.n_harm], self.ids).double()  # [Nh]
            out.append(
                {
                    "refusal": float(torch.sigmoid(m - self.threshold).mean()),
                    "kl": float(kl_divergence(self.base_logp, x[self.n_harm :]).mean()),
                    "refusal_logodds": float(m.mean()),
                }
            )
        return out


@dataclass
class Confirmed:
    """Judged generations and KL of one trial on the evaluation sets."""

    refusal_by_judge: dict[str, float]
    kl: float
    n_harmful: int
    n_harmless: int
    completions: list[str]

    @property
    def refusal(self) -> float:
        return self.refusal_by_judge["substring"]


@torch.no_grad()
def confirm(
    model: Model,
    tokenizer: Tokenizer,
    fmt: PromptFormat,
    edits: list[WeightedAblation],
    harmful: list[str],
    harmless: list[str],
    max_new_tokens: int = 64,
    batch_size: int = 64,
    judges: dict[str, tuple[str, ...]] | None = None,
    batch_rows: int = 64,
) -> list[Confirmed]:
    """Greedy completions of ``harmful`` under each edit (rows of all trials share batches, ordered by
    prompt length so a batch's rows end at similar times), judged; first-token KL on ``harmless``."""
    judges = {"substring": REFUSAL_PHRASES, **(judges or {})}
    order = length_order(tokenizer, harmful)
    comps: list[list[str]] = [[""] * len(harmful) for _ in edits]
    for rows, idx in trial_groups(model, edits):
        flat = [(t, i) for i in order for t in range(len(idx))]
        bar = tqdm(total=len(flat), desc=f"confirm {len(idx)} trial(s)", leave=False)
        for start in range(0, len(flat), batch_size):
            chunk = flat[start : start + batch_size]
            with rows.serving(torch.tensor([t for t, _ in chunk])):
                out, _ = generate_batch(
                    model,
                    tokenizer,
                    [harmful[i] for _, i in chunk],
                    fmt,
                    max_new_tokens,
                    rows=rows,
                    on_done=bar.update,
                )
            for (t, i), c in zip(chunk, out):
                comps[idx[t]][i] = c
        bar.close()
    dev = get_adapter(model).device
    lb = split_prefix(tokenize_prompts(tokenizer, harmless, fmt, dev), True, model)
    base_logp = torch.log_softmax(last_logits_shared(model, lb).double(), -1)
    logits = _last_logits(model, lb, edits, batch_rows)  # [K, n, V]
    return [
        Confirmed(
            {name: sum(is_refusal(c, ph) for c in cs) / max(1, len(cs)) for name, ph in judges.items()},
            float(kl_divergence(base_logp, x).mean()),
            len(harmful),
            len(harmless),
            cs,
        )
        for cs, x in zip(comps, logits)
    ]
