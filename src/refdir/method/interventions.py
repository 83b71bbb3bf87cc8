"""Interventions on the refusal direction (paper §2.4): ablation, addition, orthogonalization.

Hooks are plain PyTorch hooks placed through the :class:`~refdir.core.adapter.ModelAdapter`, inside
context managers that always remove them. A direction may be one vector ``[d]`` or one vector
per batch row ``[B, d]``: the latter lets selection score many candidates in one forward pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from refdir.core.adapter import (
    ModelAdapter,
    ResidualWriter,
    first_tensor,
    get_adapter,
    hidden_arg,
    project_out_axis_,
    replace_hidden_arg,
    replace_output,
)
from refdir.core.errors import RefdirError
from refdir.core.types import Model


def _as_rows(direction: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast ``[d]`` or ``[B, d]`` against activations ``[B, T, d]``."""
    r = direction.to(device=x.device, dtype=x.dtype)
    if r.dim() == 1:
        return r
    if r.shape[0] != x.shape[0]:
        raise RefdirError(f"per-row direction has {r.shape[0]} rows but the batch has {x.shape[0]}")
    return r[:, None, :]  # [B, 1, d]


def project_out(x: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """x - r r^T x for a unit direction r (``[d]`` or per-row ``[B, 1, d]``)."""
    return x - (x * unit).sum(-1, keepdim=True) * unit


def unit_vector(direction: torch.Tensor, d_model: int) -> torch.Tensor:
    if direction.shape[-1] != d_model:
        raise RefdirError(f"direction has size {direction.shape[-1]} but the model's d_model is {d_model}")
    d = direction.double()
    norm = d.norm(dim=-1, keepdim=True)
    if not torch.isfinite(d).all() or (norm == 0).any():
        raise RefdirError("direction contains NaN/inf or has zero norm")
    return (d / norm).float()


@contextlib.contextmanager
def hooks(handles: list[RemovableHandle]) -> Iterator[None]:
    """Remove every hook handle on exit, whatever happens inside."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _ablation_handles(
    ad: ModelAdapter, unit_for: Callable[[torch.Tensor], torch.Tensor]
) -> list[RemovableHandle]:
    """Hooks projecting ``unit_for(x)`` (a unit direction broadcastable against ``x``) out of the input of
    every decoder layer and the output of every attention and MLP write: directional ablation's placement,
    shared by the one-direction context and the per-row one."""

    def pre(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x = hidden_arg(args, kwargs)
        return replace_hidden_arg(args, kwargs, project_out(x, unit_for(x)))

    def post(mod: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
        x = first_tensor(out)
        return replace_output(out, project_out(x, unit_for(x)))

    handles = [layer.register_forward_pre_hook(pre, with_kwargs=True) for layer in ad.layers]
    return handles + [m.register_forward_hook(post) for m in ad.attn_write + ad.mlp_write]


def _addition_handle(
    ad: ModelAdapter, layer: int, vector_for: Callable[[torch.Tensor], torch.Tensor]
) -> RemovableHandle:
    """A hook adding ``vector_for(x)`` to the residual stream entering ``layer``."""

    def pre(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x = hidden_arg(args, kwargs)
        return replace_hidden_arg(args, kwargs, x + vector_for(x))

    return ad.layers[layer].register_forward_pre_hook(pre, with_kwargs=True)


@contextlib.contextmanager
def directional_ablation(model: Model, direction: torch.Tensor) -> Iterator[None]:
    """Project the direction out of the residual stream at every layer and position.

    Hooks the input of every decoder layer and the outputs of every attention and MLP write,
    so no component can read or write along r. ``direction``: ``[d]`` or ``[B, d]``; normalized here.
    """
    ad = get_adapter(model)
    unit = unit_vector(direction, ad.d_model).to(ad.device)
    with hooks(_ablation_handles(ad, lambda x: _as_rows(unit, x))):
        yield


def orthonormal_basis(vectors: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt (float64) of ``[k, d]`` rows, in order: row i is the part of vector i orthogonal to
    rows < i."""
    out: list[torch.Tensor] = []
    for v in vectors.double():
        for b in out:
            v = v - (v @ b) * b
        n = v.norm()
        if n < 1e-9:
            raise RefdirError("the subspace's vectors are linearly dependent")
        out.append(v / n)
    return torch.stack(out)


@contextlib.contextmanager
def subspace_ablation(model: Model, vectors: torch.Tensor) -> Iterator[None]:
    """Project a whole subspace ``span(vectors)`` (``[k, d]``) out of the residual stream, everywhere.

    Refusal may span a cone of a few dimensions (Wollschläger et al. 2025); with one vector this is
    :func:`directional_ablation`. Same placement: every block input and every attention and MLP write."""
    ad = get_adapter(model)
    if vectors.shape[-1] != ad.d_model:
        raise RefdirError(f"direction has size {vectors.shape[-1]} but the model's d_model is {ad.d_model}")
    basis = orthonormal_basis(vectors.reshape(-1, ad.d_model)).float()  # [k, d]
    placed: dict = {}

    def project(x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.dtype)
        if key not in placed:
            placed[key] = basis.to(device=x.device, dtype=x.dtype)
        b = placed[key]
        return x - (x @ b.T) @ b

    def pre(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return replace_hidden_arg(args, kwargs, project(hidden_arg(args, kwargs)))

    def post(mod: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
        return replace_output(out, project(first_tensor(out)))

    handles = [layer.register_forward_pre_hook(pre, with_kwargs=True) for layer in ad.layers]
    with hooks(handles + [m.register_forward_hook(post) for m in ad.attn_write + ad.mlp_write]):
        yield


@contextlib.contextmanager
def activation_addition(model: Model, vector: torch.Tensor, layer: int, coeff: float = 1.0) -> Iterator[None]:
    """Add ``coeff * vector`` to the residual stream entering ``layer``, at every position.

    The vector is *not* normalized: the paper adds the difference-in-means itself (norm and all).
    ``vector``: ``[d]`` or ``[B, d]``.
    """
    ad = get_adapter(model)
    if not 0 <= layer < ad.n_layers:
        raise RefdirError(f"--layer {layer} is out of range: the model has layers 0..{ad.n_layers - 1}")
    if vector.shape[-1] != ad.d_model:
        raise RefdirError(f"direction has size {vector.shape[-1]} but the model's d_model is {ad.d_model}")
    v = (coeff * vector.float()).to(ad.device)
    with hooks([_addition_handle(ad, layer, lambda x: _as_rows(v, x))]):
        yield


class RowInterventions:
    """A different intervention per batch row: rows of several conditions share one forward pass.

    Each row belongs to a *group* (a condition); group g ablates the unit direction ``ablate[g]``
    (a zero row: no ablation) and adds ``add[g]`` to the residual stream entering ``layer`` (a zero
    row: nothing). A zero vector leaves activations exactly as they are, so a baseline group is the
    baseline. Decoding drops finished rows from the batch, so the hooks read which original rows the
    current pass holds from :meth:`active`, set by the generation loop before every pass.

    Why: a decode step's matmuls are ~3x less efficient at 12 rows than at 200 on a CPU, and a
    condition's batch dwindles to its few long answers; mixing conditions keeps the batch wide.
    """

    def __init__(
        self, model: Model, groups: torch.Tensor, ablate: torch.Tensor, add: torch.Tensor, layer: int
    ):
        ad = get_adapter(model)
        if ablate.shape[-1] != ad.d_model or add.shape[-1] != ad.d_model:
            raise RefdirError(
                f"direction has size {ablate.shape[-1]} but the model's d_model is {ad.d_model}"
            )
        self.ad, self.layer = ad, layer
        self.groups = groups.long().cpu()  # [B] group of each original row
        norms = ablate.double().norm(dim=-1, keepdim=True)
        self.units = torch.where(norms > 0, ablate.double() / norms.clamp_min(1e-300), 0.0).float()  # [G, d]
        self.add = add.float()  # [G, d]
        self._rows = torch.arange(len(groups))
        self._placed: dict = {}  # (table, device, dtype) -> the current rows' table there

    @contextlib.contextmanager
    def active(self, rows: torch.Tensor) -> Iterator[None]:
        """The original rows (``[b]``, in batch order) that the passes inside this context hold."""
        saved, self._rows = self._rows, rows.cpu()
        self._placed = {}
        try:
            yield
        finally:
            self._rows = saved
            self._placed = {}

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        """Install the hooks (ablation at every read and write, addition at ``layer``) for the context."""

        def rows(name: str):
            def per_row(x: torch.Tensor) -> torch.Tensor:
                # each layer's device gets the current rows' table once per pass, not once per hook call
                key = (name, x.device, x.dtype)
                if key not in self._placed:
                    table = getattr(self, name)
                    self._placed[key] = table[self.groups[self._rows]].to(device=x.device, dtype=x.dtype)
                return _as_rows(self._placed[key], x)

            return per_row

        handles = []
        if self.units.abs().sum() > 0:
            handles += _ablation_handles(self.ad, rows("units"))
        if self.add.abs().sum() > 0:
            handles.append(_addition_handle(self.ad, self.layer, rows("add")))
        with hooks(handles):
            yield


class _Passthrough(nn.Module):
    """Stands in for a decoder layer whose output is injected later: returns its input."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextlib.contextmanager
def start_at_layer(model: Model, layer: int, resid: torch.Tensor) -> Iterator[None]:
    """Run only layers >= ``layer``, feeding ``resid`` ``[B, T, d]`` as their input.

    Activation addition at layer l leaves layers < l untouched, so selection computes that
    prefix once per prompt and reuses it for every candidate at l (issue: performance).
    """
    ad = get_adapter(model)
    saved = [ad.layers[i] for i in range(layer)]
    for i in range(layer):
        ad.layers[i] = _Passthrough()

    def pre(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x = hidden_arg(args, kwargs)
        return replace_hidden_arg(
            args, kwargs, resid.to(x.dtype).expand_as(x) if resid.shape[0] == 1 else resid.to(x.dtype)
        )

    handle = ad.layers[layer].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for i, m in enumerate(saved):
            ad.layers[i] = m


def _embed_writer(ad: ModelAdapter) -> ResidualWriter:
    return ResidualWriter("embed", ad.embed, "weight", 1)


def untie_embeddings(model: Model, ad: ModelAdapter) -> None:
    """Give the unembedding its own copy of a tied embedding matrix, so an edit of the embedding leaves
    what the model reads out unchanged (the config then says untied, so a saved checkpoint keeps both)."""
    if not ad.tied:
        return
    old = ad.unembed.get_parameter("weight")  # [vocab, d], shared with the embedding until now
    ad.unembed.weight = nn.Parameter(old.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    text_config = getattr(model.config, "get_text_config", None)  # multimodal configs nest the flag
    if text_config is not None:
        text_config().tie_word_embeddings = False
    ad.tied = False


@torch.no_grad()
def orthogonalize_weights(model: Model, direction: torch.Tensor, allow_approximate: bool = False) -> Model:
    """Edit the weights in place so no component writes along r (paper Eq. 5).

    Projects r out of the token (and position) embeddings and out of every residual writer the
    adapter found (:class:`~refdir.core.adapter.ResidualWriter`: attention-output and MLP-output projections,
    every routed and shared expert, their biases). With tied embeddings the unembedding is untied first,
    so it keeps reading the original direction. Equal to :func:`directional_ablation` when the writers
    write the residual stream directly (checked numerically per layer kind); models whose writes pass
    through a norm (Gemma 2/3, OLMo 2) raise unless ``allow_approximate``. Quantized or offloaded
    weights cannot be edited in place: :func:`refdir.outputs.export.export_streaming` re-reads the source.
    """
    ad = get_adapter(model)
    bad = next(
        (
            w
            for w in ad.all_writers() + [_embed_writer(ad)]
            if w.tensor.device.type == "meta" or not w.tensor.is_floating_point()
        ),
        None,
    )
    if bad is not None:
        how = "offloaded by the device map" if bad.tensor.device.type == "meta" else "quantized"
        raise RefdirError(
            f"cannot orthogonalize {bad.name} in place: its weights are {how}; export from "
            "the full-precision source instead: refdir export --model SOURCE --direction RUN "
            "--out DIR"
        )
    if not ad.linear_writes and not allow_approximate:
        raise RefdirError(
            f"{type(model).__name__} normalizes attention/MLP outputs before adding them to the residual "
            "stream, so weight orthogonalization cannot equal ablation; pass --allow-approximate to edit the "
            "projections anyway"
        )
    unit = (
        unit_vector(direction, ad.d_model)[0] if direction.dim() == 2 else unit_vector(direction, ad.d_model)
    )
    untie_embeddings(model, ad)
    project_out_axis_(ad.embed.weight.data, unit, 1)  # [vocab, d]
    if ad.pos_embed is not None:
        project_out_axis_(ad.pos_embed.weight.data, unit, 1)
    for w in ad.all_writers():
        project_out_axis_(w.tensor.data, unit, w.axis)
    setattr(model, "_refdir_orthogonalized", True)  # a flag for readers, not a module attribute
    return model
