"""Mean residual-stream activations (resid_pre) at every layer and post-instruction position.

Accumulated in float64 over batches, never holding per-prompt activations; the forward pass
stops once the last needed layer's input is read, so the last block and the unembedding are
never computed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from tqdm.auto import tqdm

from refdir.core.adapter import get_adapter, hidden_arg
from refdir.core.prefix import expand, forward_rest, prefix_cache, split_prefix
from refdir.core.templates import Batch
from refdir.core.types import Model
from refdir.method.interventions import hooks

# A decoder layer's forward pre-hook (registered with ``with_kwargs=True``): (module, args, kwargs).
PreHook = Callable[[torch.nn.Module, tuple[Any, ...], dict[str, Any]], None]


class _StopForward(Exception):
    """Raised from a hook once every needed activation is recorded."""


def _batch_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the batch ``[B, n, d] -> [n, d]`` float64 on the CPU: in float64 where the activations are
    (CPU), in float32 on accelerators (MPS has no float64) before the float64 accumulator takes it."""
    if x.device.type == "cpu":
        return x.double().sum(0)
    return x.float().sum(0).cpu().double()


@torch.no_grad()
def mean_activations(
    model: Model,
    batch: Batch,
    n_post: int | None = None,
    batch_size: int = 16,
    desc: str | None = None,
    share_prefix: bool = True,
) -> torch.Tensor:
    """Mean resid_pre over prompts: ``[n_post, n_layers, d_model]`` float64.

    Position index p counts post-instruction tokens from the first (p = 0) to the last
    (p = n_post - 1, the token right before generation).
    """
    ad = get_adapter(model)
    n_post = n_post or batch.n_post
    # CPU, whatever the layers' devices
    total = torch.zeros(n_post, ad.n_layers, ad.d_model, dtype=torch.float64)

    def make_hook(layer: int) -> PreHook:
        def pre(mod: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = hidden_arg(args, kwargs)  # [B, T, d] on this layer's device
            total[:, layer] += _batch_sum(x[:, -n_post:, :])
            if layer == ad.n_layers - 1:
                raise _StopForward

        return pre

    n = batch.input_ids.shape[0]
    pb = split_prefix(batch, share_prefix, model)
    prefix = prefix_cache(model, pb.prefix)  # the shared template head, once, before any hook records
    handles = [
        layer.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(ad.layers)
    ]
    with hooks(handles):
        # batches of similar length, each only as wide as its longest prompt (the sum ignores order)
        for _, part in tqdm(list(pb.buckets(batch_size)), desc=desc, disable=desc is None, leave=False):
            try:
                forward_rest(model, part, expand(prefix, part.input_ids.shape[0]))
            except _StopForward:
                pass
    return total / n


class PostActivationRecorder:
    """Keeps each prompt's resid_pre at every layer and its last ``n_post`` positions during generation.

    The prompt screen already runs every training prompt through the model (its prompt pass); recording
    there makes extraction free: the candidate means are then averaged over the training prompts
    chosen after filtering (:meth:`mean`), the same numbers ``mean_activations`` computes up to
    float rounding. float32, ``n_post x n_layers x d_model`` per prompt (35 MB per 100 prompts for the 1.5B).
    """

    def __init__(self, model: Model, n_post: int):
        self.ad = get_adapter(model)
        self.n_post = n_post
        self.rows: dict[int, torch.Tensor] = {}  # screened prompt index -> [n_post, n_layers, d]
        self.valid = True  # False once a batch had fewer post-instruction tokens than expected
        self._buf: torch.Tensor | None = None

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        """Hooks on every decoder layer for the duration (they record only inside :meth:`rows_of`)."""

        def make_hook(layer: int) -> PreHook:
            def pre(mod: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                if self._buf is not None:
                    self._buf[:, :, layer] = hidden_arg(args, kwargs)[:, -self.n_post :, :].float()

            return pre

        handles = [
            layer.register_forward_pre_hook(make_hook(i), with_kwargs=True)
            for i, layer in enumerate(self.ad.layers)
        ]
        with hooks(handles):
            yield

    def bucket(self, offset: int) -> Callable[[torch.Tensor, int], AbstractContextManager[None]]:
        """A callback for the prompt pass of generation: records rows ``offset + idx`` of each bucket."""

        @contextlib.contextmanager
        def record(idx: torch.Tensor, n_post: int) -> Iterator[None]:
            if n_post < self.n_post:
                self.valid = False
                yield
                return
            # on the CPU: ~2.6 MB per prompt for an 8B model, which GPU memory needs for the KV cache
            self._buf = torch.empty(len(idx), self.n_post, self.ad.n_layers, self.ad.d_model)
            try:
                yield
                for j, i in enumerate(idx.tolist()):
                    self.rows[offset + i] = self._buf[j]
            finally:
                self._buf = None

        return record

    def mean(self, indices: list[int]) -> torch.Tensor | None:
        """Mean over the given screened prompts ``[n_post, n_layers, d]`` float64, or None if any is
        missing."""
        if not self.valid or not indices or any(i not in self.rows for i in indices):
            return None
        total = torch.zeros(self.n_post, self.ad.n_layers, self.ad.d_model, dtype=torch.float64)
        for i in indices:
            total += self.rows[i].double()
        return total / len(indices)


@contextlib.contextmanager
def recording_resid_pre(model: Model, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """``{layer: [B, T, d]}``: the residual stream entering each of ``layers`` in the (last) pass run inside.

    For passes that later restart from a layer
    (:func:`~refdir.method.interventions.start_at_layer`): activation
    addition at layer l leaves everything below l as in the baseline pass that recorded it."""
    ad = get_adapter(model)
    seen: dict[int, torch.Tensor] = {}

    def make_hook(layer: int) -> PreHook:
        def pre(mod: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen[layer] = hidden_arg(args, kwargs).detach()

        return pre

    with hooks([ad.layers[i].register_forward_pre_hook(make_hook(i), with_kwargs=True) for i in layers]):
        yield seen


@torch.no_grad()
def read_resid_pre(
    model: Model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layers: list[int],
    read: Callable[[int, torch.Tensor], None],
) -> None:
    """One forward pass that hands each of ``layers``' input ``[B, T, d]`` to ``read(layer, x)`` and stops
    after the last of them (later blocks and the unembedding are never computed).

    The per-prompt readers (the monitor's projections, the cone's principal components) share this: every
    position is kept, so the caller picks which (post-instruction, instruction end, ...)."""
    from refdir.method.refusal import position_ids

    ad = get_adapter(model)
    wanted, last = set(layers), max(layers)

    def make(layer: int) -> PreHook:
        def pre(mod: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            read(layer, hidden_arg(args, kwargs))
            if layer == last:
                raise _StopForward

        return pre

    dev = ad.device
    mask = attention_mask.to(dev)
    handles = [ad.layers[i].register_forward_pre_hook(make(i), with_kwargs=True) for i in sorted(wanted)]
    with hooks(handles):
        try:
            model(
                input_ids=input_ids.to(dev),
                attention_mask=mask,
                position_ids=position_ids(mask),
                use_cache=False,
            )
        except _StopForward:
            pass
