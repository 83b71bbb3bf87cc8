"""Prefix batches: the prompt prefix a batch shares runs once, in the model's KV cache.

Every chat-formatted prompt of a batch starts with the same tokens: BOS, the system prompt (Qwen
inserts its default one), the user-turn header. With Qwen2.5's default system prompt that is
about 24 of a typical prompt's 45-50 tokens. refdir runs those tokens once per batch (or once
per candidate direction, where the intervention changes them), keeps their keys and values in
the model's own KV cache, and feeds each row only its remaining tokens (issue: performance).

Layout of a :class:`PrefixBatch` row: ``[shared prefix | left padding | rest of the prompt]``.
Position ids count real tokens only, so every row sees exactly the positions it would see alone;
the padding is masked out. Results equal a full forward up to float rounding (tests: every
supported family). Rows run in length buckets (:func:`length_buckets`), and prompts longer than the
model's context are refused before any forward pass (:func:`check_context`).

Greedy decoding and log-likelihood scoring on top of these batches live in :mod:`refdir.core.forward`.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch

from refdir.core.errors import RefdirError
from refdir.core.templates import Batch
from refdir.core.types import Model, Tokenizer


@dataclass
class PrefixBatch:
    """Prompts split into the prefix they all share and their left-padded rests."""

    prefix: torch.Tensor  # [P] token ids shared by every row (P may be 0)
    input_ids: torch.Tensor  # [B, T] the rest of each prompt, left-padded
    attention_mask: torch.Tensor  # [B, P + T]: ones over the prefix, then each row's padding mask
    n_post: int

    @property
    def n_prefix(self) -> int:
        return int(self.prefix.shape[0])

    def rows(self, idx) -> PrefixBatch:
        """A sub-batch (rows ``idx``: slice or index tensor), keeping the shared prefix."""
        return PrefixBatch(self.prefix, self.input_ids[idx], self.attention_mask[idx], self.n_post)

    def repeat(self, k: int) -> PrefixBatch:
        """``k`` copies of the batch, candidate-major (rows c*B .. c*B+B-1 are copy c)."""
        return PrefixBatch(
            self.prefix, self.input_ids.repeat(k, 1), self.attention_mask.repeat(k, 1), self.n_post
        )

    def rest_lengths(self) -> torch.Tensor:
        """Real (unpadded) tokens in each row's rest ``[B]``."""
        return self.attention_mask[:, self.n_prefix :].long().sum(-1)

    def trim(self) -> PrefixBatch:
        """The same rows without the rest columns that are padding in every row (after :meth:`rows`)."""
        t = max(int(self.rest_lengths().max()), 1) if self.input_ids.shape[0] else 0
        cut = self.input_ids.shape[1] - t
        if cut <= 0:
            return self
        p = self.n_prefix
        mask = torch.cat([self.attention_mask[:, :p], self.attention_mask[:, p + cut :]], dim=1)
        return PrefixBatch(self.prefix, self.input_ids[:, cut:], mask, self.n_post)

    def buckets(self, max_rows: int, overhead: int | None = None):
        """Yield ``(idx, sub)``: row indices ``[b]`` and their trimmed sub-batch, in length buckets
        (:func:`length_buckets`); results scattered back by ``idx`` are in the batch's row order."""
        kw = {} if overhead is None else {"overhead": overhead}
        for g in length_buckets(self.rest_lengths().tolist(), max_rows, **kw):
            idx = torch.tensor(g)  # on the CPU: it indexes tensors on every device of a device map
            yield idx, self.rows(idx).trim()

    def positions(self) -> torch.Tensor:
        """Position ids of the rest tokens ``[B, T]`` counting only real tokens (padding gets a dummy)."""
        pos = (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return pos[:, self.n_prefix :]


# A forward pass costs about as much as this many extra tokens whatever its size (reading every weight
# once: ~0.5 s for the 1.5B fp32 model on 2 CPU cores, where a token costs ~15 ms): the price of one
# more length bucket.
FORWARD_OVERHEAD_TOKENS = 32


def length_buckets(
    lengths: list[int], max_rows: int, overhead: int = FORWARD_OVERHEAD_TOKENS
) -> list[list[int]]:
    """Row indices grouped into batches of similar length: the fewest computed tokens, padding included.

    Chat prompts vary a lot in length (JailbreakBench: 15 tokens on average, 30 at most), so a batch
    padded to its longest row wastes about half its work. Rows are sorted by length and cut where the
    padding saved beats ``overhead`` tokens per extra forward pass (exact dynamic programme over the
    sorted order, at most ``max_rows`` per batch). Returns groups in ascending length.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    srt = [lengths[i] for i in order]
    n, max_rows = len(order), max(1, max_rows)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for j in range(1, n + 1):  # best[j]: cost of the first j sorted rows; a batch's width is its last row's
        for i in range(max(0, j - max_rows), j):
            c = best[i] + overhead + (j - i) * srt[j - 1]
            if c < best[j]:
                best[j], cut[j] = c, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def sliding_window(model: Model) -> int | None:
    """The smallest attention window of any layer (None: every layer attends to the whole context)."""
    cfg = getattr(model, "config", None)
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if (
        window is None
        or (types and "sliding_attention" not in types)
        or getattr(cfg, "use_sliding_window", True) is False
    ):
        return None
    return int(window)


def context_length(model: Model) -> int | None:
    """The model's context (``max_position_embeddings`` of its text config), None where it does not say."""
    cfg: Any = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return int(n) if n else None


def check_context(model: Model, n_tokens: int, extra: int = 0) -> None:
    """A prompt (plus the tokens to generate) longer than the context is an input error, raised before the
    forward pass: past the context a model computes garbage, slowly (a 200,000-character prompt ground on)."""
    n = context_length(model)
    if n is not None and n_tokens + extra > n:
        more = f" + {extra} new tokens" if extra else ""
        raise RefdirError(
            f"a prompt of {n_tokens} tokens{more} exceeds the model's context of {n} tokens; "
            "shorten the prompt (or lower --max-new-tokens)"
        )


def check_prompts_fit(
    model: Model, tokenizer: Tokenizer, instructions: list[str], fmt, extra: int = 0
) -> None:
    """:func:`check_context` for every chat-formatted instruction, before any forward pass or progress bar."""
    from refdir.core.templates import format_prompt

    n = context_length(model)
    if n is None:
        return
    for s in instructions:
        if len(s) > n // 8:  # a token holds at most a few characters: only long texts can overflow
            check_context(model, len(tokenizer(format_prompt(tokenizer, s, fmt))["input_ids"]), extra)


def split_prefix(
    batch: Batch,
    share: bool = True,
    model: Model | None = None,
    extra: int = 0,
    max_prefix: int | None = None,
) -> PrefixBatch:
    """Split a left-padded batch into the longest shared token prefix and the rests.

    The post-instruction tokens (at least one) stay in every row's rest: they are read and scored.
    ``share=False`` gives an empty prefix: the plain batch, for comparisons. Padding between prefix and rest
    would count toward a sliding attention window, so with ``model`` given, the prefix is shared
    only while the whole layout (plus ``extra`` generated tokens) fits in the model's window.
    ``max_prefix`` caps the prefix (teacher forcing needs the logits of every prompt's last token).
    """
    if model is not None:
        check_context(model, batch.input_ids.shape[1], extra)
        from refdir.core.adapter import input_device

        dev = input_device(model)  # the one place a batch meets the model: its input device
        if batch.input_ids.device != dev:
            batch = Batch(batch.input_ids.to(dev), batch.attention_mask.to(dev), batch.n_post)
    window = sliding_window(model) if model is not None else None
    pb = _split(batch, share, max_prefix)
    if window is not None and pb.n_prefix and pb.attention_mask.shape[1] + extra >= window:
        return _split(batch, False)
    return pb


def _split(batch: Batch, share: bool, max_prefix: int | None = None) -> PrefixBatch:
    ids, mask = batch.input_ids, batch.attention_mask.bool()
    seqs = [row[m] for row, m in zip(ids, mask)]
    p = min(len(s) for s in seqs) - max(batch.n_post, 1)  # post-instruction positions stay in the rest
    if max_prefix is not None:
        p = min(p, max_prefix)
    if share and p > 0:
        first = seqs[0][:p]
        for s in seqs[1:]:
            diff = (s[:p] != first[:p]).nonzero()
            if len(diff):
                p = int(diff[0])
    else:
        p = 0
    p = max(p, 0)
    rests = [s[p:] for s in seqs]
    t = max(len(r) for r in rests)
    out_ids = torch.zeros(len(seqs), t, dtype=ids.dtype, device=ids.device)  # pad ids are masked out
    out_mask = torch.zeros(len(seqs), p + t, dtype=batch.attention_mask.dtype, device=ids.device)
    out_mask[:, :p] = 1
    for i, r in enumerate(rests):
        out_ids[i, t - len(r) :] = r
        out_mask[i, p + t - len(r) :] = 1
    return PrefixBatch(seqs[0][:p].clone(), out_ids, out_mask, batch.n_post)


def cache_kwarg(model: Model) -> str:
    """transformers 5.x renamed ``past_key_values`` to ``cache``; accept both."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def returned_cache(out):
    return getattr(out, "cache", None) if getattr(out, "cache", None) is not None else out.past_key_values


@torch.no_grad()
def prefix_cache(model: Model, prefix: torch.Tensor, rows: int = 1):
    """KV cache of the shared prefix under the *current* hooks, for a batch of ``rows`` prompts.

    ``rows`` > 1 runs the prefix once per row: use it when every row has its own intervention
    (a different candidate direction per row); otherwise expand a one-row cache with :func:`expand`.
    Returns None for an empty prefix.
    """
    if prefix.numel() == 0:
        return None
    ids = prefix[None].expand(rows, -1)
    pos = torch.arange(prefix.shape[0], device=prefix.device)[None].expand(rows, -1)
    out = model(
        input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=pos, use_cache=True, logits_to_keep=1
    )
    return returned_cache(out)


def expand(cache, repeats: int):
    """A fresh copy of ``cache`` with each row repeated ``repeats`` times (row-major: r0,r0,..,r1,..)."""
    if cache is None:
        return None
    c = copy.deepcopy(cache)
    if repeats > 1:
        c.batch_repeat_interleave(repeats)
    return c


@torch.no_grad()
def forward_rest(model: Model, pb: PrefixBatch, cache, logits_to_keep: int = 1, use_cache: bool = False):
    """Run the rest tokens of ``pb`` on top of a prefix cache (consumed: pass a copy). Returns the model
    output."""
    kw = {} if cache is None else {cache_kwarg(model): cache}
    return model(
        input_ids=pb.input_ids,
        attention_mask=pb.attention_mask,
        position_ids=pb.positions(),
        use_cache=use_cache or cache is not None,
        logits_to_keep=logits_to_keep,
        **kw,
    )


@torch.no_grad()
def last_logits_shared(model: Model, pb: PrefixBatch, max_rows: int = 64, on_bucket=None) -> torch.Tensor:
    """Last-position logits ``[B, V]``; the prefix runs here, under the current hooks; rows run in length
    buckets. ``on_bucket(idx, sub)``, if given, is a context manager entered around each bucket's pass
    (rows ``idx``, trimmed sub-batch ``sub``)."""
    head = prefix_cache(model, pb.prefix)
    out = None
    for idx, sub in pb.buckets(max_rows):
        with on_bucket(idx, sub) if on_bucket else contextlib.nullcontext():
            logits = forward_rest(model, sub, expand(head, len(idx))).logits[:, -1, :].float()
        if out is None:
            out = logits.new_empty(pb.input_ids.shape[0], logits.shape[-1])
        out[idx] = logits
    return cast(torch.Tensor, out)  # None only for a batch of no rows


def per_trial_last_logits(
    model: Model,
    pb: PrefixBatch,
    n_trials: int,
    batch_rows: int,
    attach: Callable[[torch.Tensor], contextlib.AbstractContextManager[Any]],
) -> torch.Tensor:
    """Last-position logits of every prompt under each of ``n_trials`` per-row edits: ``[K, n, V]``.

    ``attach(trials)`` installs hooks under which batch row i runs trial ``trials[i]`` (``[rows]``).
    An edit changes the template prefix too, so the prefix runs once per trial (one row each) and its
    KV cache serves that trial's rows; prompts go in length buckets, each run only as wide as its
    longest rest. ``batch_rows`` bounds rows per pass (trials x prompts)."""
    n = pb.input_ids.shape[0]
    per = max(1, batch_rows // n)
    groups = list(pb.buckets(n, overhead=max(1, FORWARD_OVERHEAD_TOKENS // per)))
    out: torch.Tensor | None = None
    for i in range(0, n_trials, per):
        trials = torch.arange(i, min(i + per, n_trials))
        k = len(trials)
        with attach(trials):
            head = prefix_cache(model, pb.prefix, rows=k)  # one row per trial
        for g, sub in groups:
            m = g.shape[0]
            with attach(trials.repeat_interleave(m)):  # rows c*m .. c*m+m-1: trial c
                logits = forward_rest(model, sub.repeat(k), expand(head, m)).logits[:, -1, :]
            logits = logits.float().view(k, m, -1)
            if out is None:
                out = logits.new_empty(n_trials, n, logits.shape[-1])
            out[i : i + k, g] = logits
    return cast(torch.Tensor, out)
