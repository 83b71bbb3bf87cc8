"""Batched forward passes and greedy generation that compute the shared prompt prefix once.

Every chat-formatted prompt of a batch starts with the same tokens: BOS, the system prompt (Qwen
inserts its default one), the user-turn header. With Qwen2.5's default system prompt that is
about 24 of a typical prompt's 45-50 tokens. refdir runs those tokens once per batch (or once
per candidate direction, where the intervention changes them), keeps their keys and values in
the model's own KV cache, and feeds each row only its remaining tokens (issue: performance).

Layout of a :class:`PrefixBatch` row: ``[shared prefix | left padding | rest of the prompt]``.
Position ids count real tokens only, so every row sees exactly the positions it would see alone;
the padding is masked out. Results equal a full forward up to float rounding (tests: every
supported family).

The greedy loop drops a row from the batch (and its KV cache) as soon as it emits an end token,
so a batch costs what its unfinished rows cost: refusals end after a dozen tokens. With per-row
interventions (``rows``: :class:`~refdir.method.interventions.RowInterventions`) one batch holds rows of
several conditions: the prefix then runs once per condition and serves that condition's rows.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from dataclasses import dataclass

import torch

from refdir.core.errors import RefdirError
from refdir.core.templates import Batch, left_padded


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


def sliding_window(model) -> int | None:
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


def context_length(model) -> int | None:
    """The model's context (``max_position_embeddings`` of its text config), None where it does not say."""
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return int(n) if n else None


def check_context(model, n_tokens: int, extra: int = 0) -> None:
    """A prompt (plus the tokens to generate) longer than the context is an input error, raised before the
    forward pass: past the context a model computes garbage, slowly (a 200,000-character prompt ground on)."""
    n = context_length(model)
    if n is not None and n_tokens + extra > n:
        more = f" + {extra} new tokens" if extra else ""
        raise RefdirError(
            f"a prompt of {n_tokens} tokens{more} exceeds the model's context of {n} tokens; "
            "shorten the prompt (or lower --max-new-tokens)"
        )


def check_prompts_fit(model, tokenizer, instructions: list[str], fmt, extra: int = 0) -> None:
    """:func:`check_context` for every chat-formatted instruction, before any forward pass or progress bar."""
    from refdir.core.templates import format_prompt

    n = context_length(model)
    if n is None:
        return
    for s in instructions:
        if len(s) > n // 8:  # a token holds at most a few characters: only long texts can overflow
            check_context(model, len(tokenizer(format_prompt(tokenizer, s, fmt))["input_ids"]), extra)


def split_prefix(
    batch: Batch, share: bool = True, model=None, extra: int = 0, max_prefix: int | None = None
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


def _cache_kwarg(model) -> str:
    """transformers 5.x renamed ``past_key_values`` to ``cache``; accept both."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _returned_cache(out):
    return getattr(out, "cache", None) if getattr(out, "cache", None) is not None else out.past_key_values


@torch.no_grad()
def prefix_cache(model, prefix: torch.Tensor, rows: int = 1):
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
    return _returned_cache(out)


def expand(cache, repeats: int):
    """A fresh copy of ``cache`` with each row repeated ``repeats`` times (row-major: r0,r0,..,r1,..)."""
    if cache is None:
        return None
    c = copy.deepcopy(cache)
    if repeats > 1:
        c.batch_repeat_interleave(repeats)
    return c


@torch.no_grad()
def forward_rest(model, pb: PrefixBatch, cache, logits_to_keep: int = 1, use_cache: bool = False):
    """Run the rest tokens of ``pb`` on top of a prefix cache (consumed: pass a copy). Returns the model
    output."""
    kw = {} if cache is None else {_cache_kwarg(model): cache}
    return model(
        input_ids=pb.input_ids,
        attention_mask=pb.attention_mask,
        position_ids=pb.positions(),
        use_cache=use_cache or cache is not None,
        logits_to_keep=logits_to_keep,
        **kw,
    )


@torch.no_grad()
def last_logits_shared(model, pb: PrefixBatch, max_rows: int = 64, on_bucket=None) -> torch.Tensor:
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
    return out


def _mergeable(cache) -> bool:
    """Plain growing KV caches (full attention), whose per-row padding can be widened after the fact."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer).__name__ == "DynamicLayer" for layer in layers)


def _row_ctx(rows, idx: torch.Tensor):
    """The :class:`~refdir.method.interventions.RowInterventions` context for a pass over original rows
    ``idx``."""
    return rows.active(idx) if rows is not None else contextlib.nullcontext()


@torch.no_grad()
def _prefix_heads(model, pb: PrefixBatch, rows):
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
def bucketed_prefill(model, pb: PrefixBatch, bucket: bool = True, on_bucket=None, rows=None):
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
        parts.append((_returned_cache(out), out.logits[:, -1, :].float()))
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


def end_token_ids(model, tokenizer) -> list[int]:
    """Tokens that end a reply: the generation config's EOS ids and the tokenizer's EOS."""
    ids: list[int] = []
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in ([eos] if isinstance(eos, int) else list(eos or [])) + [tokenizer.eos_token_id]:
        if e is not None and int(e) not in ids:
            ids.append(int(e))
    return ids


@torch.no_grad()
def greedy_generate(
    model,
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
    kw = _cache_kwarg(model)
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
    model, seqs: list[list[int]], n_cont: list[int], max_rows: int = 32, on_rows=None
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
