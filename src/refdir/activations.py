"""Mean residual-stream activations (resid_pre) at every layer and post-instruction position.

Accumulated in float64 over batches, never holding per-prompt activations; the forward pass
stops once the last needed layer's input is read, so the last block and the unembedding are
never computed.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .adapter import get_adapter, hidden_arg
from .forward import expand, forward_rest, prefix_cache, split_prefix
from .interventions import hooks
from .refusal import position_ids
from .templates import Batch


class _StopForward(Exception):
    """Raised from a hook once every needed activation is recorded."""


@torch.no_grad()
def mean_activations(model, batch: Batch, n_post: int | None = None, batch_size: int = 16,
                     desc: str | None = None, share_prefix: bool = True) -> torch.Tensor:
    """Mean resid_pre over prompts: ``[n_post, n_layers, d_model]`` float64.

    Position index p counts post-instruction tokens from the first (p = 0) to the last
    (p = n_post - 1, the token right before generation).
    """
    ad = get_adapter(model)
    n_post = n_post or batch.n_post
    total = torch.zeros(n_post, ad.n_layers, ad.d_model, dtype=torch.float64, device=ad.device)

    def make_hook(layer: int):
        def pre(mod, args, kwargs):
            x = hidden_arg(args, kwargs)  # [B, T, d]
            total[:, layer] += x[:, -n_post:, :].double().sum(0)
            if layer == ad.n_layers - 1:
                raise _StopForward
        return pre

    n = batch.input_ids.shape[0]
    pb = split_prefix(batch, share_prefix, model)
    prefix = prefix_cache(model, pb.prefix)  # the shared template head, once, before any hook records
    handles = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(ad.layers)]
    with hooks(handles):
        for i in tqdm(range(0, n, batch_size), desc=desc, disable=desc is None, leave=False):
            part = pb.rows(slice(i, i + batch_size))
            try:
                forward_rest(model, part, expand(prefix, part.input_ids.shape[0]))
            except _StopForward:
                pass
    return total / n


@torch.no_grad()
def resid_pre_all(model, batch: Batch, layers: list[int]) -> dict[int, torch.Tensor]:
    """Full resid_pre ``[B, T, d]`` at the given layers for one (small) batch: selection's prefix cache."""
    ad = get_adapter(model)
    out: dict[int, torch.Tensor] = {}
    last = max(layers)

    def make_hook(layer: int):
        def pre(mod, args, kwargs):
            out[layer] = hidden_arg(args, kwargs).detach().clone()
            if layer == last:
                raise _StopForward
        return pre

    handles = [ad.layers[i].register_forward_pre_hook(make_hook(i), with_kwargs=True) for i in layers]
    with hooks(handles):
        try:
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                  position_ids=position_ids(batch.attention_mask), use_cache=False)
        except _StopForward:
            pass
    return out
