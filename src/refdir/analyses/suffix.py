"""Adversarial suffixes by Greedy Coordinate Gradient (Zou et al. 2023), sized for a CPU budget.

One suffix of ``n_tokens`` is optimized jointly on a few harmful training prompts so the model's
reply starts with an affirmative target ("Sure, here is ..."). Each step: the gradient of the target
loss w.r.t. the one-hot suffix gives, per position, the top-k promising substitutions; a batch of
single-token swaps is evaluated exactly and the best kept. Candidates that do not survive a
decode/encode round trip are skipped, so the saved text reproduces the optimized tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from refdir.core.adapter import get_adapter, input_device
from refdir.core.prefix import PrefixBatch, expand, forward_rest, prefix_cache
from refdir.core.templates import PromptFormat, add_special, format_prompt
from refdir.core.types import Model, Tokenizer
from refdir.method.refusal import decode_text

if TYPE_CHECKING:  # annotations only
    from transformers import Cache

MARK = "\u0000SUFFIX\u0000"


@dataclass
class GCGResult:
    suffix: str
    token_ids: list[int]
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0


def _pieces(
    tok: Tokenizer, instruction: str, target: str, fmt: PromptFormat
) -> tuple[list[int], list[int], list[int]]:
    """Token ids before the suffix, after it (template), and of the target completion."""
    text = format_prompt(tok, f"{instruction} {MARK}", fmt)
    before, after = text.split(MARK)
    pre = tok(before, add_special_tokens=add_special(tok, before))["input_ids"]
    post = tok(after, add_special_tokens=False)["input_ids"]
    tgt = tok(target, add_special_tokens=False)["input_ids"]
    return pre, post, tgt


def _allowed_tokens(tok: Tokenizer, vocab_rows: int) -> torch.Tensor:
    """Printable, non-special tokens: a suffix a user could paste. ``[vocab_rows]`` (embedding rows)."""
    special = set(tok.all_special_ids)
    ok = torch.zeros(vocab_rows, dtype=torch.bool)
    for i in range(min(len(tok), vocab_rows)):
        if i in special:
            continue
        s = decode_text(tok, [i], skip_special_tokens=False)
        ok[i] = s.isprintable() and s.strip() != "" and s.isascii()
    return ok


def _round_trips(tok: Tokenizer, ids: torch.Tensor) -> bool:
    """Whether the text of suffix ``ids`` ``[n]`` encodes back to the same ids (so the saved text
    reproduces the optimized tokens)."""
    text = decode_text(tok, ids, skip_special_tokens=False)
    return bool(tok(text, add_special_tokens=False)["input_ids"] == ids.tolist())


def _batch_loss(
    model: Model,
    pre_cache: Cache | None,
    n_pre: int,
    suffixes: list[torch.Tensor],
    post: list[int],
    tgt: list[int],
) -> torch.Tensor:
    """Mean target cross-entropy ``[K]`` of one prompt with each candidate suffix.

    Every candidate shares the tokens before the suffix (template head and instruction): their KV
    cache ``pre_cache`` (one row) is computed once per prompt and step, and only suffix + template
    tail + target run per candidate. Candidates have equal token length, so no padding is needed.
    """
    dev = input_device(model)
    k = len(suffixes)
    rest = torch.stack([torch.cat([s, torch.tensor(post + tgt, dtype=s.dtype)]) for s in suffixes]).to(dev)
    # ids live in the cache
    pre = torch.zeros(n_pre if pre_cache is not None else 0, dtype=torch.long, device=dev)
    pb = PrefixBatch(pre, rest, torch.ones(k, pre.shape[0] + rest.shape[1], dtype=torch.long, device=dev), 0)
    n = len(tgt)
    logits = forward_rest(model, pb, expand(pre_cache, k), logits_to_keep=n + 1).logits[:, :-1]  # [K, n, V]
    lp = torch.log_softmax(logits.float(), -1)
    t = torch.tensor(tgt, device=lp.device)  # the logits sit on the unembedding's device
    return -lp[:, torch.arange(n, device=lp.device), t].mean(-1)


def gcg(
    model: Model,
    tok: Tokenizer,
    instructions: list[str],
    targets: list[str],
    n_tokens: int = 20,
    steps: int = 50,
    topk: int = 64,
    batch: int = 32,
    seed: int = 0,
    time_budget: float | None = None,
    fmt: PromptFormat = PromptFormat(),
    progress: bool = True,
) -> GCGResult:
    """Optimize one suffix for all ``instructions`` toward their ``targets`` (a step or time budget)."""
    ad = get_adapter(model)
    embed = ad.embed
    g = torch.Generator().manual_seed(seed)
    pieces = [_pieces(tok, i, t, fmt) for i, t in zip(instructions, targets)]
    allowed = _allowed_tokens(tok, embed.weight.shape[0])
    init = tok(" !" * n_tokens, add_special_tokens=False)["input_ids"][:n_tokens]
    suffix = torch.tensor(init + init[-1:] * (n_tokens - len(init)))
    res = GCGResult(decode_text(tok, suffix, skip_special_tokens=False), suffix.tolist())
    t0 = time.time()
    dev = embed.weight.device
    pre_caches = [prefix_cache(model, torch.tensor(pre, device=dev)) for pre, _, _ in pieces]  # fixed all run
    W = embed.weight  # [V, d]
    bar = tqdm(range(steps), desc="gcg", disable=not progress, leave=False)
    for step in bar:
        if time_budget is not None and time.time() - t0 > time_budget:
            break
        # gradient of the loss w.r.t. the one-hot suffix
        one_hot = torch.zeros(n_tokens, W.shape[0], dtype=W.dtype, device=W.device)
        one_hot[torch.arange(n_tokens), suffix.to(W.device)] = 1.0
        one_hot.requires_grad_(True)
        with torch.enable_grad():
            total = 0.0
            for pre, post, tgt in pieces:
                e_suf = one_hot @ W  # [n, d]
                ids_pre, ids_post = torch.tensor(pre), torch.tensor(post + tgt)
                emb = torch.cat([embed(ids_pre.to(W.device)), e_suf, embed(ids_post.to(W.device))])[None]
                logits = model(inputs_embeds=emb, use_cache=False).logits[0]
                n = len(tgt)
                lp = torch.log_softmax(logits[-n - 1 : -1].float(), -1)
                loss = -lp[torch.arange(n), torch.tensor(tgt, device=lp.device)].mean()
                loss.backward()
                total += float(loss.detach())
        assert one_hot.grad is not None  # filled by the backward passes above
        grad = one_hot.grad.clone()  # [n, V]
        grad[:, ~allowed.to(grad.device)] = float("inf")
        top = (-grad).topk(topk, dim=-1).indices.cpu()  # [n, k]
        # a batch of single-token swaps, one random position each
        pos = torch.randint(n_tokens, (batch,), generator=g)
        choice = top[pos, torch.randint(topk, (batch,), generator=g)]
        cands = suffix.repeat(batch, 1)
        cands[torch.arange(batch), pos] = choice
        keep = [c for c in cands if _round_trips(tok, c)]
        if not keep:
            res.losses.append(total / len(pieces))
            continue
        with torch.no_grad():
            cand_loss = torch.zeros(len(keep))
            for (pre, post, tgt), cache in zip(pieces, pre_caches):
                cand_loss += _batch_loss(model, cache, len(pre), keep, post, tgt).cpu()
        best = int(cand_loss.argmin())
        if float(cand_loss[best]) / len(pieces) < total / len(pieces):
            suffix = keep[best].clone()
        res.losses.append(min(total, float(cand_loss[best])) / len(pieces))
        bar.set_postfix(loss=f"{res.losses[-1]:.3f}")
        res.steps = step + 1
    res.suffix, res.token_ids = decode_text(tok, suffix, skip_special_tokens=False), suffix.tolist()
    res.seconds = time.time() - t0
    return res


def affirmative_target(instruction: str) -> str:
    """The usual GCG target: "Sure, here is" plus the request rephrased lightly."""
    text = instruction.strip().rstrip(".?!")
    return "Sure, here is " + (text[0].lower() + text[1:] if text else "")


def universality_screen(
    model: Model,
    tok: Tokenizer,
    held: list[str],
    suffix: str,
    n_tokens: int,
    seed: int,
    fmt: PromptFormat,
    max_new_tokens: int,
) -> dict[str, float]:
    """Refusal rate on held-out harmful prompts with no suffix, a random suffix of the same length
    (resampled per prompt) and the optimized suffix (paper §5.1's universality check)."""
    from refdir.analyses.suffix_analysis import random_suffixes
    from refdir.evaluation.conditions import generate_judged, refusal_rate

    rand = random_suffixes(tok, len(held), n_tokens, seed)
    rates: dict[str, float] = {}
    for name, prompts in (
        ("none", held),
        ("random", [f"{p} {r}" for p, r in zip(held, rand)]),
        ("adversarial", [f"{p} {suffix}" for p in held]),
    ):
        items = generate_judged(model, tok, prompts, [None] * len(prompts), fmt, max_new_tokens, 16, name)
        rates[name] = refusal_rate(items)
    return rates
