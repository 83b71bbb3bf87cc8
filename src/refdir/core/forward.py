"""Greedy generation and log-likelihood scoring on prefix batches (:mod:`refdir.core.prefix`).

The greedy loop drops a row from the batch (and its KV cache) as soon as it emits an end token,
so a batch costs what its unfinished rows cost: refusals end after a dozen tokens. With per-row
interventions (``rows``: :class:`~refdir.method.interventions.RowInterventions`) one batch holds rows of
several conditions: the prefix then runs once per condition and serves that condition's rows. The
prompt pass runs in length buckets whose KV caches are stacked back into one (:func:`bucketed_prefill`),
and decoding writes keys and values in place into room grown by halves (:class:`_RoomLayer`).

The prefix-batch names (``PrefixBatch``, ``split_prefix``, ``prefix_cache``, ...) are importable from
here too, where they lived before :mod:`refdir.core.prefix`.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch

from refdir.core.errors import RefdirError
from refdir.core.prefix import (
    FORWARD_OVERHEAD_TOKENS,
    PrefixBatch,
    cache_kwarg,
    check_context,
    check_prompts_fit,
    context_length,
    expand,
    forward_rest,
    last_logits_shared,
    length_buckets,
    prefix_cache,
    returned_cache,
    sliding_window,
    split_prefix,
)
from refdir.core.templates import left_padded
from refdir.core.types import Model, Tokenizer

__all__ = [  # the moved names stay importable from here
    "FORWARD_OVERHEAD_TOKENS",
    "PrefixBatch",
    "bucketed_prefill",
    "cache_kwarg",
    "check_context",
    "check_prompts_fit",
    "context_length",
    "continuation_logprobs",
    "end_token_ids",
    "expand",
    "forward_rest",
    "greedy_generate",
    "last_logits_shared",
    "length_buckets",
    "prefix_cache",
    "returned_cache",
    "sliding_window",
    "split_prefix",
]
_cache_kwarg = cache_kwarg  # the name benchmarks/pipeline.py imports


def _mergeable(cache) -> bool:
    """Plain growing KV caches (full attention), whose per-row padding can be widened after the fact."""
    layers: Any = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer).__name__ == "DynamicLayer" for layer in layers)


def _row_ctx(rows, idx: torch.Tensor):
    """The :class:`~refdir.method.interventions.RowInterventions` context for a pass over original rows
    ``idx``."""
    return rows.active(idx) if rows is not None else contextlib.nullcontext()


@torch.no_grad()
def _prefix_heads(model: Model, pb: PrefixBatch, rows):
    """The shared prefix's KV cache and, per row, which of its rows serves that row ``[B]``.

    Without per-row interventions the prefix runs once (one row, serving all). With them it runs once
    per group (condition) present: one row per group, expanded later to that group's rows."""
    if rows is None or pb.n_prefix == 0:
        return prefix_cache(model, pb.prefix), None
    groups = rows.groups
    present = torch.unique(groups)  # sorted group ids
    reps = torch.stack([(groups == g).nonzero()[0, 0] for g in present.tolist()])  # first row of each group
    with rows.active(reps):
        head = prefix_cache(model, pb.prefix, rows=len(reps))
    return head, torch.searchsorted(present, groups)


def _head_for(head, serve: torch.Tensor | None, idx: torch.Tensor):
    """A fresh copy of the prefix cache for the rows ``idx`` of a batch (see :func:`_prefix_heads`)."""
    if serve is None:
        return expand(head, len(idx))
    c = copy.deepcopy(head)
    c.batch_select_indices(serve[idx])
    return c


@torch.no_grad()
def bucketed_prefill(model: Model, pb: PrefixBatch, bucket: bool = True, on_bucket=None, rows=None):
    """Prompt pass of a generation batch run in length buckets, then one KV cache for the whole batch.

    Each bucket runs only as wide as its longest prompt; its cache is then left-padded (masked slots,
    keys and values zero) to the batch's width ``P + T`` and the buckets are stacked back in row order,
    so decoding proceeds on the whole batch exactly as after a single padded pass (same positions, same
    mask, float rounding aside). Caches of other kinds (sliding windows, linear attention) are run in
    one pass. ``on_bucket(idx, n_post)``, if given, is a context manager entered around each bucket's
    pass (rows ``idx`` of ``pb``): how the prompt screen records activations. ``rows``: per-row
    interventions (:class:`~refdir.method.interventions.RowInterventions`, hooks attached by the caller).
    Returns (cache, last-position logits ``[B, V]`` float32).
    """
    b, p, t = pb.input_ids.shape[0], pb.n_prefix, pb.input_ids.shape[1]
    head, serve = _prefix_heads(model, pb, rows)
    groups = length_buckets(pb.rest_lengths().tolist(), b) if bucket else []
    if len(groups) <= 1 or sliding_window(model) is not None or (head is not None and not _mergeable(head)):
        groups = [list(range(b))]  # one pass over the batch as it is (rows in their own order)
    parts = []
    for g in groups:
        idx = torch.tensor(g)
        sub = pb.rows(idx).trim() if len(groups) > 1 else pb
        with on_bucket(idx, pb.n_post) if on_bucket else contextlib.nullcontext(), _row_ctx(rows, idx):
            out = forward_rest(model, sub, _head_for(head, serve, idx), use_cache=True)
        parts.append((returned_cache(out), out.logits[:, -1, :].float()))
        if len(groups) > 1 and not _mergeable(parts[-1][0]):  # found out on the first bucket: one pass
            return bucketed_prefill(model, pb, bucket=False, on_bucket=on_bucket, rows=rows)
    if len(parts) == 1:
        return parts[0]
    inv = torch.empty(b, dtype=torch.long)  # CPU: the cache's layers may sit on several devices
    inv[torch.tensor([i for g in groups for i in g])] = torch.arange(b)
    cache = parts[0][0]
    for li, layer in enumerate(cache.layers):
        for attr in ("keys", "values"):
            padded = []
            for c, _ in parts:
                x = getattr(c.layers[li], attr)  # [b_g, heads, P + T_g, d_head]
                gap = x.new_zeros(x.shape[0], x.shape[1], p + t - x.shape[2], x.shape[3])
                padded.append(torch.cat([x[:, :, :p], gap, x[:, :, p:]], dim=2))
            setattr(layer, attr, torch.cat(padded)[inv])
    return cache, torch.cat([lg for _, lg in parts])[inv]


class _RoomLayer:
    """Stands in for a ``DynamicLayer`` during greedy decoding: keys and values live in a buffer with room
    for the next tokens, and each step writes its one new position in place.

    Why: ``DynamicLayer.update`` concatenates, copying the layer's whole cache at every step; at 200 rows
    and a few hundred positions that is gigabytes of memory traffic per step. Here the buffer grows by
    half its length, at least 64 positions, at most up to the tokens still to come, so a row's cache is
    copied a few times per completion instead of once per token (with the default 64 new tokens: once,
    to the full room). Dropping rows copies the unused room too: rows end rarely, steps are many.
    The keys and values attention reads are views of the buffer: the same numbers.
    """

    _kinds: dict[type, type] = {}
    # set by install() on the layer object (these annotations only type them)
    keys: torch.Tensor
    values: torch.Tensor
    _kbuf: torch.Tensor  # [B, heads, room, d_head]
    _vbuf: torch.Tensor
    _len: int  # positions filled
    _limit: int  # positions the decode may reach

    @classmethod
    def install(cls, layer, room: int) -> None:
        """Give a filled ``DynamicLayer`` room for up to ``room`` more positions (same object, same data)."""
        t = layer.keys.shape[-2]
        layer._len, layer._limit = t, t + room
        layer._kbuf, layer._vbuf = layer.keys, layer.values  # [B, heads, T, d_head]; grown on first update
        base = type(layer)
        if base not in cls._kinds:
            # the cache's own class as the only base (``__class__`` assignment needs the same layout),
            # with this class's methods in front
            methods = {k: vars(cls)[k] for k in ("update", "batch_select_indices", "_view", "_grow")}
            cls._kinds[base] = type("Room" + base.__name__, (base,), {"__slots__": (), **methods})
        layer.__class__ = cls._kinds[base]

    def _view(self) -> None:
        self.keys, self.values = self._kbuf[..., : self._len, :], self._vbuf[..., : self._len, :]

    def _grow(self, need: int) -> None:
        cap = max(need, min(self._limit, self._len + max(64, self._len // 2)))
        for name in ("_kbuf", "_vbuf"):
            old = getattr(self, name)
            new = old.new_empty(*old.shape[:-2], cap, old.shape[-1])
            new[..., : self._len, :] = old[..., : self._len, :]
            setattr(self, name, new)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n = self._len + key_states.shape[-2]
        if n > self._kbuf.shape[-2]:
            self._grow(n)
        self._kbuf[..., self._len : n, :] = key_states
        self._vbuf[..., self._len : n, :] = value_states
        self._len = n
        self._view()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._kbuf, self._vbuf = self._kbuf[indices, ...], self._vbuf[indices, ...]
        self._view()


def _make_room(cache, room: int):
    """Decode ``room`` more tokens into ``cache`` without per-step copies (plain full-attention caches only:
    sliding windows and linear-attention states keep their own update rules)."""
    if room > 0 and _mergeable(cache):
        for layer in cache.layers:
            _RoomLayer.install(layer, room)
    return cache


def end_token_ids(model: Model, tokenizer: Tokenizer) -> list[int]:
    """Tokens that end a reply: the generation config's EOS ids and the tokenizer's EOS."""
    ids: list[int] = []
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in ([eos] if isinstance(eos, int) else list(eos or [])) + [tokenizer.eos_token_id]:
        if e is not None and int(e) not in ids:
            ids.append(int(e))
    return ids


@torch.no_grad()
def greedy_generate(
    model: Model,
    pb: PrefixBatch,
    max_new_tokens: int,
    end_ids: list[int],
    first_logits: bool = False,
    on_bucket=None,
    rows=None,
    settled=None,
    on_done=None,
) -> tuple[list[list[int]], torch.Tensor | None]:
    """Greedy (argmax) decoding of a batch; rows leave the batch when they emit an end token.

    Plain greedy, like the paper: no repetition penalty or other logits processors. Returns the
    new token ids of each row (end token excluded) and, if asked, the logits at the first generated
    position ``[B, V]``. ``on_bucket``, ``rows``: see :func:`bucketed_prefill`. ``settled(tokens)``,
    if given, says a row's tokens so far already decide what the caller wants from it (the prompt
    screen: a refusal phrase has appeared): the row leaves the batch with the tokens it has. ``on_done(n)``,
    if given, hears of every ``n`` rows that finish (progress bars that move with the rows, not the batches).
    """
    b = pb.input_ids.shape[0]
    cache, logits = bucketed_prefill(model, pb, on_bucket=on_bucket, rows=rows)
    cache = _make_room(cache, max_new_tokens - 1)
    kw = cache_kwarg(model)
    first = logits.clone() if first_logits else None
    ends = torch.tensor(end_ids, device=logits.device)
    alive = torch.arange(b)  # original row of each batch row (CPU, like every index)
    mask = pb.attention_mask
    next_pos = mask.long().sum(-1)  # [B] position of the next token
    tokens: list[list[int]] = [[] for _ in range(b)]
    for step in range(max_new_tokens):
        nxt = logits.argmax(-1)  # [b_alive]
        done = torch.isin(nxt, ends)
        for j, (r, t, d) in enumerate(zip(alive.tolist(), nxt.tolist(), done.tolist())):
            if not d:
                tokens[r].append(t)
                if settled is not None and settled(tokens[r]):
                    done[j] = True
        if step == max_new_tokens - 1:
            break
        if done.any():
            keep = (~done).nonzero().squeeze(-1).cpu()
            if on_done is not None:
                on_done(len(alive) - keep.numel())
            if keep.numel() == 0:
                alive = alive[:0]
                break
            cache.batch_select_indices(keep)
            alive, mask, next_pos, nxt = alive[keep], mask[keep], next_pos[keep], nxt[keep]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        with _row_ctx(rows, alive):
            out = model(
                input_ids=nxt[:, None].to(mask.device),
                attention_mask=mask,
                position_ids=next_pos[:, None],
                use_cache=True,
                logits_to_keep=1,
                **{kw: cache},
            )
        next_pos = next_pos + 1
        logits = out.logits[:, -1, :].float()
    if on_done is not None and len(alive):
        on_done(len(alive))  # the rows that ran to the token limit
    return tokens, first


@torch.no_grad()
def continuation_logprobs(
    model: Model, seqs: list[list[int]], n_cont: list[int], max_rows: int = 32, on_rows=None
) -> list[tuple[float, bool]]:
    """Log-likelihood scoring: for each row, the summed log-probability of its last ``n_cont[r]`` tokens
    given the tokens before them, and whether greedy decoding would reproduce them.

    What a benchmark's multiple-choice and log-likelihood requests need, computed without the waste
    of the plain way (one padded forward per batch, vocabulary-sized log-probs at every position):

    * rows whose inputs (all tokens but the last) agree run once (MMLU's four one-token answers);
    * inputs are sorted so neighbours share prefixes, and each batch's shared prefix (a benchmark's
      fixed preamble, the question every answer of an item repeats) runs once, in the KV cache;
    * the unembedding runs only at the scored positions: ``[rows, n_cont, V]``, not ``[rows, T, V]``.

    Equal to a full forward per row up to float rounding (tests). ``on_rows(n)`` hears of every ``n``
    rows scored.
    """
    from refdir.core.adapter import input_device

    by_input: dict[tuple[int, ...], list[int]] = {}
    for r, s in enumerate(seqs):
        if not 0 < n_cont[r] < len(s):
            raise RefdirError(f"row {r}: {n_cont[r]} scored tokens of {len(s)} (needs 1 .. {len(s) - 1})")
        by_input.setdefault(tuple(s[:-1]), []).append(r)
    keys = sorted(by_input)  # lexicographic: neighbours share their longest prefixes
    dev = input_device(model)
    out: list[tuple[float, bool] | None] = [None] * len(seqs)
    for start in range(0, len(keys), max(1, max_rows)):
        chunk = keys[start : start + max_rows]
        keep = max(n_cont[r] for k in chunk for r in by_input[k])  # scored positions, at the right end
        pb = split_prefix(left_padded([list(k) for k in chunk], keep, dev), model=model)
        head = prefix_cache(model, pb.prefix)
        for idx, sub in pb.buckets(max_rows):
            k = min(keep, sub.input_ids.shape[1])  # a bucket of short rows is narrower than keep
            logp = forward_rest(model, sub, expand(head, len(idx)), logits_to_keep=k).logits
            logp = logp.float().log_softmax(-1)  # [b, k, V]; every row's c <= its rest <= k
            greedy = logp.argmax(-1).cpu()  # [b, k]
            for j, i in enumerate(idx.tolist()):
                for r in by_input[chunk[i]]:
                    c = n_cont[r]
                    tgt = torch.tensor(seqs[r][-c:], dtype=torch.long)
                    lp = logp[j, k - c :].gather(-1, tgt.to(logp.device)[:, None])  # [c, 1]
                    out[r] = (float(lp.sum()), bool((greedy[j, k - c :] == tgt).all()))
            if on_rows is not None:
                on_rows(sum(len(by_input[chunk[i]]) for i in idx.tolist()))
    return out  # type: ignore[return-value]
