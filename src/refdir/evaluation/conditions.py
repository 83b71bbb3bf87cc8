"""Evaluation (paper §3-4, App. D, G): refusal rates, judges, KL and cross-entropy per condition.

A *condition* is a context in which the model runs: ``baseline``, ``ablation`` (r̂ projected out
everywhere), ``actadd-`` (−r at the chosen layer on harmful prompts), ``actadd+`` (+r on harmless
prompts) and ``ortho`` (weights orthogonalized). Conditions are context managers, so the same
generation and scoring code serves all of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from refdir.core.adapter import input_device
from refdir.core.forward import PrefixBatch, expand, forward_rest, length_buckets, prefix_cache, split_prefix
from refdir.core.templates import Batch, PromptFormat, add_special, format_prompt, left_padded
from refdir.core.types import Model, Tokenizer
from refdir.method.activations import recording_resid_pre
from refdir.method.directions import Direction
from refdir.method.interventions import (
    RowInterventions,
    activation_addition,
    directional_ablation,
    start_at_layer,
)
from refdir.method.refusal import REFUSAL_PHRASES, generate, generate_batch, is_refusal


@dataclass
class ActAddFactory:
    """Context factory of activation addition (``coeff * vector`` at ``layer``'s input) that also says so.

    Layers below ``layer`` run exactly as in the baseline, so a teacher-forced pass that already ran
    the baseline on the same tokens (:func:`kl_and_ce`) recomputes only layers >= ``layer`` from the
    baseline's recorded residual stream: for the chosen layer 21 of 28, a quarter of the work."""

    model: Model
    vector: torch.Tensor  # [d]
    layer: int
    coeff: float = 1.0

    def __call__(self) -> contextlib.AbstractContextManager:
        return activation_addition(self.model, self.vector, self.layer, self.coeff)


def _parse_condition(name: str, coeff: float = 1.0) -> tuple[bool, float | None]:
    """What a condition name does: (ablates r̂?, coefficient of r added at the direction's layer or None)."""
    if name in ("baseline", "none"):
        return False, None
    if name in ("ablation", "ablate"):
        return True, None
    if name in ("actadd+", "actadd-", "actadd"):
        return False, -coeff if name == "actadd-" else coeff
    raise ValueError(f"unknown intervention '{name}' (use none, ablate, actadd or ortho)")


def condition_factory(model: Model, name: str, direction: Direction, coeff: float = 1.0):
    """A zero-argument factory of :func:`condition` (an :class:`ActAddFactory` for activation addition)."""
    _, add = _parse_condition(name, coeff)
    if add is not None:
        return ActAddFactory(model, direction.vector, direction.layer, add)
    return lambda: condition(model, name, direction, coeff)


def condition(
    model: Model, name: str, direction: Direction, coeff: float = 1.0
) -> contextlib.AbstractContextManager:
    """The intervention context for a condition name (``none`` and ``baseline`` are the same)."""
    ablate, add = _parse_condition(name, coeff)
    if ablate:
        return directional_ablation(model, direction.vector)
    if add is not None:
        return activation_addition(model, direction.vector, direction.layer, add)
    return contextlib.nullcontext()


@dataclass
class Judged:
    prompt: str
    completion: str
    refused: bool
    category: str | None = None


def completion_rows(split: str, cond: str, items: list[Judged]) -> list[dict]:
    """``completions.jsonl`` rows of one split under one condition."""
    return [
        {
            "split": split,
            "condition": cond,
            "prompt": j.prompt,
            "category": j.category,
            "refused": j.refused,
            "completion": j.completion,
        }
        for j in items
    ]


def refusal_rate(items: list[Judged]) -> float:
    return sum(j.refused for j in items) / max(len(items), 1)


def per_category(items: list[Judged]) -> dict[str, float]:
    cats: dict[str, list[bool]] = {}
    for j in items:
        cats.setdefault(j.category or "uncategorized", []).append(j.refused)
    return {c: sum(v) / len(v) for c, v in sorted(cats.items())}


def generate_judged(
    model: Model,
    tokenizer: Tokenizer,
    prompts: list[str],
    categories: list[str | None],
    fmt: PromptFormat,
    max_new_tokens: int,
    batch_size: int,
    desc: str,
    phrases: tuple[str, ...] = REFUSAL_PHRASES,
) -> list[Judged]:
    comps = generate(model, tokenizer, prompts, fmt, max_new_tokens, batch_size, desc=desc)
    return [Judged(p, c, is_refusal(c, phrases), cat) for p, c, cat in zip(prompts, comps, categories)]


@dataclass
class GenJob:
    """Prompts to complete under one condition (``baseline``, ``ablation``, ``actadd+``, ``actadd-``)."""

    name: str  # e.g. "harmful/ablation": the progress bar and the key of the result
    condition: str
    prompts: list[str]
    categories: list[str | None]
    vector: torch.Tensor | None = None  # [d] ablated instead of the run's direction (a second direction)


def _row_tables(
    jobs: list[GenJob], direction: Direction, coeff: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-job ablation direction and added vector ``[G, d]`` each (zero rows: none)."""
    d = direction.vector.shape[-1]
    ablate, add = torch.zeros(len(jobs), d), torch.zeros(len(jobs), d)
    for g, job in enumerate(jobs):
        abl, coef = _parse_condition(job.condition, coeff)
        if abl:
            ablate[g] = (direction.vector if job.vector is None else job.vector).float()
        if coef is not None:
            add[g] = coef * direction.vector.float()
    return ablate, add


def generate_conditions(
    model: Model,
    tokenizer: Tokenizer,
    jobs: list[GenJob],
    direction: Direction,
    fmt: PromptFormat,
    max_new_tokens: int,
    batch_size: int,
    phrases: tuple[str, ...] = REFUSAL_PHRASES,
    coeff: float = 1.0,
) -> dict[str, list[Judged]]:
    """Greedy completions of every job, judged, with rows of different conditions in the same batches.

    Each batch row carries its own condition (:class:`~refdir.method.interventions.RowInterventions`), so a
    batch stays wide while one condition's rows finish early (refusals end after a dozen tokens, answers
    run to the limit): put short-lived and long-lived jobs next to each other in ``jobs``, whose rows
    are cut into batches of ``batch_size`` in order. Completions equal those of one condition at a time.
    """
    ablate, add = _row_tables(jobs, direction, coeff)
    flat = [(g, i) for g, job in enumerate(jobs) for i in range(len(job.prompts))]
    comps: list[list[str]] = [[""] * len(job.prompts) for job in jobs]  # every slot filled below
    bar = tqdm(total=len(flat), desc="generate " + ", ".join(j.name for j in jobs), leave=False)
    for start in range(0, len(flat), batch_size):
        chunk = flat[start : start + batch_size]
        rows = RowInterventions(model, torch.tensor([g for g, _ in chunk]), ablate, add, direction.layer)
        with rows.attached():
            # the bar moves as rows finish
            out, _ = generate_batch(
                model,
                tokenizer,
                [jobs[g].prompts[i] for g, i in chunk],
                fmt,
                max_new_tokens,
                rows=rows,
                on_done=bar.update,
            )
        for (g, i), c in zip(chunk, out):
            comps[g][i] = c
    bar.close()
    return {
        job.name: [
            Judged(p, c, is_refusal(c, phrases), cat) for p, c, cat in zip(job.prompts, cs, job.categories)
        ]
        for job, cs in zip(jobs, comps)
    }


# ----------------------------------------------------------------------------------------------
# Second judge: a chat model asked to classify each completion (App. D.3: refusals phrased
# otherwise, evasive non-answers). Reads the label from next-token logits: no generation.


# ----------------------------------------------------------------------------------------------
# KL and cross-entropy on text the model is made to read (teacher forcing)


def _teacher_forced_ids(
    tokenizer: Tokenizer, prompts: list[str], completions: list[str], fmt: PromptFormat, n_tokens: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each chat-formatted prompt and of its completion cut to ``n_tokens``."""
    texts = [format_prompt(tokenizer, p, fmt) for p in prompts]
    prompt_ids = [tokenizer(t, add_special_tokens=add_special(tokenizer, t))["input_ids"] for t in texts]
    comp_ids = [tokenizer(c, add_special_tokens=False)["input_ids"][:n_tokens] for c in completions]
    return prompt_ids, comp_ids


def _teacher_forced_batch(
    prompt_ids: list[list[int]], comp_ids: list[list[int]], pad: int, device
) -> tuple[Batch, list[int], list[int], int]:
    """Left-padded prompt+completion sequences, completion lengths, targets, and the shortest prompt's
    length."""
    seqs = [p + c for p, c in zip(prompt_ids, comp_ids)]
    return (
        left_padded(seqs, 1, device, pad),
        [len(c) for c in comp_ids],
        [x for c in comp_ids for x in c],
        min(map(len, prompt_ids)),
    )


@torch.no_grad()
def _completion_logits(
    model: Model, pb: PrefixBatch, n_tokens: int, record: tuple[int, ...] = ()
) -> tuple[torch.Tensor, int, dict]:
    """Logits ``[B, k, V]`` (float32) at the last ``k = min(n_tokens + 1, T)`` positions, under current hooks,
    and the residual stream entering each layer in ``record`` at the rest tokens ``{layer: [B, T, d]}``."""
    k = min(n_tokens + 1, pb.input_ids.shape[1])
    head = prefix_cache(model, pb.prefix)
    with recording_resid_pre(model, record) as seen:
        out = forward_rest(model, pb, expand(head, pb.input_ids.shape[0]), logits_to_keep=k)
    return out.logits.float(), k, seen


@torch.no_grad()
def _actadd_from_resid(
    model: Model, pb: PrefixBatch, n_tokens: int, f: ActAddFactory, resid: torch.Tensor
) -> torch.Tensor:
    """:func:`_completion_logits` under activation addition, running only layers >= ``f.layer`` on the rest
    tokens: their input there is the baseline's ``resid`` ``[B, T, d]`` plus the vector. The shared prefix
    (one row) runs whole under the hook: its cache must hold every layer."""
    with f():
        head = prefix_cache(model, pb.prefix)
    v = (f.coeff * f.vector.float()).to(resid.device, resid.dtype)
    with start_at_layer(model, f.layer, resid + v):
        out = forward_rest(
            model,
            pb,
            expand(head, pb.input_ids.shape[0]),
            logits_to_keep=min(n_tokens + 1, pb.input_ids.shape[1]),
        )
    return out.logits.float()


def _row_logp(logits: torch.Tensor, b: int, k: int, c: int) -> torch.Tensor:
    """Row ``b``'s log-probs ``[max(c, 1), V]`` (float64) at the prompt's last token and the first ``c - 1``
    completion tokens: the distributions that predict the completion (the row's last token predicts
    nothing)."""
    lo = k - 1 - c
    return torch.log_softmax(logits[b, lo : lo + max(c, 1)].double(), -1)


def kl_and_ce(
    model: Model,
    tokenizer: Tokenizer,
    prompts: list[str],
    completions: list[str],
    fmt: PromptFormat,
    ctx_factories: Mapping[str, Callable[[], contextlib.AbstractContextManager]],
    n_tokens: int = 16,
    batch_size: int = 8,
    max_positions: int = 256,
) -> dict[str, dict]:
    """For each condition: KL(baseline || condition) at the first token and averaged over the first
    ``n_tokens`` of the baseline completion, and CE of the baseline completion under the condition.

    Streams over small batches (at most ``max_positions`` scored positions each: with a 150k vocabulary
    a position's logits take 0.6 MB, so memory stays a few hundred MB) and converts one row at a time
    to float64 log-probs; the template prefix is shared within each batch.
    """
    dev = input_device(model)
    batch_size = max(1, min(batch_size, max_positions // (n_tokens + 1)))
    acc = {name: {"kl_first": 0.0, "kl_mean": 0.0, "ce_sum": 0.0, "ce_n": 0} for name in ctx_factories}
    prompt_ids, comp_ids = _teacher_forced_ids(tokenizer, prompts, completions, fmt, n_tokens)
    # activation addition reuses the baseline pass (always run: it is the KL reference) below its layer
    record = tuple(sorted({f.layer for f in ctx_factories.values() if isinstance(f, ActAddFactory)}))
    # batches of similar total length (the sums below do not depend on the order)
    for g in length_buckets([len(p) + len(c) for p, c in zip(prompt_ids, comp_ids)], batch_size):
        batch, lens, tgt_flat, shortest = _teacher_forced_batch(
            [prompt_ids[i] for i in g], [comp_ids[i] for i in g], tokenizer.pad_token_id or 0, dev
        )
        pb = split_prefix(batch, True, model, max_prefix=shortest - 1)  # every prompt's last token stays
        base, k, resid = _completion_logits(model, pb, n_tokens, record)
        offsets = [0]
        for c in lens:
            offsets.append(offsets[-1] + c)
        for name, factory in ctx_factories.items():
            if name == "baseline":
                cur = base
            elif isinstance(factory, ActAddFactory):
                cur = _actadd_from_resid(model, pb, n_tokens, factory, resid[factory.layer])
            else:
                with factory():
                    cur, _, _ = _completion_logits(model, pb, n_tokens)
            a = acc[name]
            for j, c in enumerate(lens):
                blp = _row_logp(base, j, k, c)
                lp = blp if cur is base else _row_logp(cur, j, k, c)
                kl = (blp.exp() * (blp - lp)).sum(-1)  # [max(c, 1)]
                a["kl_first"] += float(kl[0])
                a["kl_mean"] += float(kl.mean())
                if c:
                    tgt = torch.tensor(tgt_flat[offsets[j] : offsets[j + 1]], device=lp.device)
                    a["ce_sum"] += float(-lp[torch.arange(c, device=lp.device), tgt].sum())
                    a["ce_n"] += c
            del cur
    n = max(len(prompts), 1)
    return {
        name: {
            "kl_first": a["kl_first"] / n,
            "kl_mean": a["kl_mean"] / n,
            "ce": a["ce_sum"] / max(a["ce_n"], 1),
            "ce_tokens": a["ce_n"],
        }
        for name, a in acc.items()
    }
