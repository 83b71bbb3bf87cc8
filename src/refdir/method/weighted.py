"""Weighted, norm-preserving ablation: the edit family a search explores, with exact hook and weight forms.

:class:`WeightedAblation` removes a direction (or a rank-k subspace) from each residual writer with its own
strength per layer and per component (attention output; MLP, i.e. every routed and shared expert), from
the embeddings with one strength, and optionally restores each edited matrix's channel norms:

* ``norm="output"``: every output channel (row of ``W [d_model, in]``) keeps its norm — heretic's
  "MPOA" restores the same norms, but projects the row-normalized matrix and stores a low-rank SVD of the
  change; here ``W' = diag(s) P W`` exactly, with ``P = I - Σ a_i b_i b_iᵀ``;
* ``norm="input"``: every input channel (column) keeps its norm, ``W' = P W diag(c)``.

Both are exact as hooks: ``y -> s ⊙ P y`` on the writer's output (its bias goes along, ``b' = s ⊙ P b``),
``x -> c ⊙ x`` on its input. Without norms, ``P`` is linear, so projecting a whole block's output equals
editing every writer inside it; with norms the scales differ per writer, so hooks sit on each writer
module — which fused expert parameters (one module for all experts, outputs summed inside it) do not
have: there the weight form exists and the hook form raises. :class:`TrialRows` gives every batch row its
own edit (many trials per forward pass), with the protocol of
:class:`~refdir.method.interventions.RowInterventions` so generation can drop finished rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from refdir.core.adapter import ModelAdapter, first_tensor, get_adapter, replace_output
from refdir.core.errors import RefdirError
from refdir.core.types import Model
from refdir.core.writers import ResidualWriter
from refdir.method.edits import Edit
from refdir.method.interventions import hooks, orthonormal_basis, untie_embeddings

NORMS = ("none", "output", "input")


@dataclass(frozen=True, eq=False)
class WeightedAblation(Edit):
    """Ablate ``directions`` with a strength per layer and component; optionally keep channel norms.

    ``directions``: ``[d]`` one direction, ``[k, d]`` a subspace (orthonormalized in order), ``[L, k, d]``
    a subspace per layer. ``attn``/``mlp``: strength per layer (1 removes the component, 0 leaves it,
    >1 overshoots). ``embed``: strength on the token (and position) embeddings, with layer 0's basis.
    ``vector_strengths``: a factor per basis vector (rank-k edits). The paper's orthogonalization is
    ``attn = mlp = [1]*L, embed = 1`` (:meth:`paper`).
    """

    directions: torch.Tensor
    attn: list[float]
    mlp: list[float]
    embed: float = 0.0
    vector_strengths: list[float] | None = None
    norm: str = "none"
    kind: ClassVar[str] = "weighted_ablation"
    tensor_fields: ClassVar[tuple[str, ...]] = ("directions",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.norm not in NORMS:
            raise RefdirError(f"norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if len(self.attn) != len(self.mlp):
            raise RefdirError(f"attn has {len(self.attn)} layer strengths but mlp has {len(self.mlp)}")
        k = self.bases().shape[1]
        if self.vector_strengths is not None and len(self.vector_strengths) != k:
            raise RefdirError(f"{len(self.vector_strengths)} vector strengths for {k} basis vectors")

    @staticmethod
    def paper(direction: torch.Tensor, n_layers: int) -> WeightedAblation:
        """The paper's orthogonalization (Eq. 5) as a point of this family."""
        return WeightedAblation(direction, [1.0] * n_layers, [1.0] * n_layers, embed=1.0)

    @property
    def n_layers(self) -> int:
        return len(self.attn)

    def bases(self) -> torch.Tensor:
        """Orthonormal basis per layer ``[L, k, d]`` (float32)."""
        dirs = self.directions.float()
        if dirs.dim() == 1:
            dirs = dirs[None]
        if dirs.dim() == 2:
            b = orthonormal_basis(dirs).float()
            return b[None].expand(self.n_layers, *b.shape)
        if dirs.dim() != 3 or dirs.shape[0] != self.n_layers:
            raise RefdirError(
                f"directions must be [d], [k, d] or [L={self.n_layers}, k, d], got {dirs.shape}"
            )
        # per layer: a layer whose vectors are all zero (layer 0's difference of means at template
        # positions, where every prompt has the same tokens) is left unedited
        return torch.stack(
            [orthonormal_basis(x).float() if x.abs().sum() > 0 else torch.zeros_like(x) for x in dirs]
        )

    def coefficients(self, component: str) -> torch.Tensor:
        """Strength per layer and basis vector ``[L, k]`` for ``attn``/``mlp`` (``embed``: ``[1, k]``)."""
        k = 1 if self.directions.dim() == 1 else self.directions.shape[-2]  # bases() has k rows too
        vec = torch.tensor(self.vector_strengths or [1.0] * k, dtype=torch.float64)
        if component == "embed":
            return (self.embed * vec)[None]
        per_layer = torch.tensor(getattr(self, component), dtype=torch.float64)
        return per_layer[:, None] * vec[None]

    def hooks(self, model: Model) -> contextlib.AbstractContextManager[None]:
        return TrialRows(model, [self], torch.zeros(1, dtype=torch.long)).attached()

    def apply_to_weights(self, model: Model, allow_approximate: bool = False) -> Model:
        return write_weights(model, self, allow_approximate)

    def exact_on(self, model: Model) -> bool:
        ad = get_adapter(model)
        return ad.linear_writes and not (self.norm != "none" and ad.fused_experts)


# ------------------------------------------------------------------------------------------------
# channel scales: the same numbers for the hook form and the weight form


def as_matrix(t: torch.Tensor, axis: int) -> torch.Tensor:
    """A 2-D writer as ``[d, in]`` float64 (Linear: as is; Conv1D ``[in, d]``: transposed)."""
    w = t.detach().double()
    return w if axis == 0 else w.T


def project(w: torch.Tensor, basis: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``P w = w - Bᵀ(a ⊙ (B w))`` on ``w [d, ...]``, ``basis [k, d]``, ``coef [k]`` (float64)."""
    b = basis.to(w)
    return w - b.T @ (coef.to(w)[:, None] * (b @ w))


def channel_scales(w: torch.Tensor, basis: torch.Tensor, coef: torch.Tensor, norm: str) -> torch.Tensor:
    """Scales restoring ``w [d, in]``'s output (``[d]``) or input (``[in]``) channel norms after ``P``."""
    edited = project(w, basis, coef)
    dim = 1 if norm == "output" else 0
    before, after = w.norm(dim=dim), edited.norm(dim=dim)
    return torch.where(after > 0, before / after.clamp_min(1e-300), torch.ones_like(after))


def is_bias(w: ResidualWriter) -> bool:
    """A bias writer: ``[d]``, or fused experts' ``[E, d]``."""
    return w.tensor.dim() == 1 or "bias" in w.attr.lower()


def _module_weight(writers: list[ResidualWriter]) -> ResidualWriter:
    weights = [w for w in writers if not is_bias(w)]
    if len(weights) != 1:
        raise RefdirError(f"{writers[0].name}: expected one weight per writer module, found {len(weights)}")
    return weights[0]


def by_module(writers: list[ResidualWriter]) -> list[list[ResidualWriter]]:
    """Writers grouped by the module holding them, in order."""
    groups: dict[int, list[ResidualWriter]] = {}
    for w in writers:
        groups.setdefault(id(w.module), []).append(w)
    return list(groups.values())


def component_writers(ad: ModelAdapter, layer: int) -> dict[str, list[ResidualWriter]]:
    """A layer's writers split into the attention output and the MLP (every expert, shared experts)."""
    attn = [w for w in ad.writers[layer] if w.module is ad.attn_out[layer]]
    return {"attn": attn, "mlp": [w for w in ad.writers[layer] if w.module is not ad.attn_out[layer]]}


# ------------------------------------------------------------------------------------------------
# weight form


def edit_matrix(
    mat: torch.Tensor, basis: torch.Tensor, coef: torch.Tensor, norm: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``mat [d, in]`` float64 edited (``diag(s) P W`` / ``P W diag(c)`` / ``P W``) and the output scales
    its bias needs (None unless ``norm == "output"``)."""
    edited = project(mat, basis, coef)
    if norm == "none":
        return edited, None
    s = channel_scales(mat, basis, coef, norm)
    if norm == "output":
        return s[:, None] * edited, s
    return edited * s[None], None


def edit_bias(
    b: torch.Tensor, basis: torch.Tensor, coef: torch.Tensor, s: torch.Tensor | None
) -> torch.Tensor:
    """A bias ``[d]`` as its module's edited output sees it: ``s ⊙ P b`` (float64)."""
    pb = project(b.double()[:, None], basis, coef)[:, 0]
    return pb if s is None else s * pb


@torch.no_grad()
def _edit_module_(writers: list[ResidualWriter], basis: torch.Tensor, coef: torch.Tensor, norm: str) -> None:
    """Edit one module's writers in place (:func:`edit_matrix`, :func:`edit_bias`); ``basis [k, d]``,
    ``coef [k]`` float64. Fused experts ``[E, ., .]`` are edited one expert at a time, each with its own
    scales (and its row of an ``[E, d]`` bias with them)."""
    scales: list[torch.Tensor | None] = []  # output scales per expert (one entry for a 2-D weight)
    for w in (w for w in writers if not is_bias(w)):
        t = w.tensor
        mats, axis = ([t], w.axis) if t.dim() == 2 else (list(t), w.axis - 1)
        for m in mats:
            edited, s = edit_matrix(as_matrix(m, axis), basis, coef, norm)
            m.copy_((edited if axis == 0 else edited.T).to(m.dtype))
            scales.append(s)
    for w in (w for w in writers if is_bias(w)):
        t = w.tensor
        for e, b in enumerate([t] if t.dim() == 1 else list(t)):  # [d] or fused [E, d]
            b.copy_(edit_bias(b, basis, coef, scales[e] if e < len(scales) else None).to(b.dtype))


@torch.no_grad()
def write_weights(model: Model, edit: WeightedAblation, allow_approximate: bool = False) -> Model:
    """The weight form, in place: every writer of every layer, then the embeddings."""
    ad = get_adapter(model)
    if any(w.tensor.device.type == "meta" or not w.tensor.is_floating_point() for w in ad.all_writers()):
        raise RefdirError(
            "cannot edit offloaded or quantized weights in place; export from the full-precision source: "
            "refdir export --model SOURCE --run RUN --trial N --out DIR"
        )
    if not ad.linear_writes and not allow_approximate:
        raise RefdirError(
            f"{type(model).__name__} normalizes attention/MLP outputs before adding them to the residual "
            "stream, so a weight edit cannot equal the hook form; pass --allow-approximate to edit anyway"
        )
    bases = edit.bases()  # [L, k, d]
    for comp in ("attn", "mlp"):
        coef = edit.coefficients(comp)  # [L, k]
        for layer in range(ad.n_layers):
            if not coef[layer].any():
                continue
            for group in by_module(component_writers(ad, layer)[comp]):
                _edit_module_(group, bases[layer].double(), coef[layer], edit.norm)
    a = edit.coefficients("embed")[0]
    if a.any():
        untie_embeddings(model, ad)
        for emb in [ad.embed] + ([ad.pos_embed] if ad.pos_embed is not None else []):
            w = emb.weight.data  # [vocab, d]
            w.copy_(project(w.double().T, bases[0].double(), a).T.to(w.dtype))
    return model


# ------------------------------------------------------------------------------------------------
# hook form, one edit per batch row


@dataclass
class SiteTable:
    """Per-trial tables of one hook site: basis ``[K, k, d]``, coefficients ``[K, k]``, output scales
    ``[K, d]`` and input scales ``[K, in]`` (None: all ones)."""

    basis: torch.Tensor
    coef: torch.Tensor
    out_scale: torch.Tensor | None = None
    in_scale: torch.Tensor | None = None
    placed: dict = field(default_factory=dict)


def _stack_or_none(items: list[torch.Tensor | None], size: int) -> torch.Tensor | None:
    if all(x is None for x in items):
        return None
    return torch.stack([torch.ones(size, dtype=torch.float64) if x is None else x for x in items])


class TrialRows:
    """Batch row ``i`` runs under ``edits[groups[i]]``: K trials scored in one forward pass.

    Sites: the embeddings, and per layer the attention and MLP outputs — each block's output for edits
    that keep no norms, each writer module for those that do (there each trial's scales apply). Tables
    are built once (float64 scales, same numbers as :func:`write_weights`). Like ``RowInterventions``:
    ``groups`` ``[B]``, :meth:`active` (the rows a pass holds), :meth:`attached` (the hooks)."""

    def __init__(self, model: Model, edits: list[WeightedAblation], groups: torch.Tensor):
        self.ad = ad = get_adapter(model)
        self.groups = groups.long().cpu()
        self._rows = torch.arange(len(groups))
        self.per_writer = any(e.norm != "none" for e in edits)
        if self.per_writer and ad.fused_experts:
            raise RefdirError(
                "norm-preserving edits have no hook form on fused experts: each expert's scales differ and "
                "the experts' outputs are summed inside one module; score with norm='none' or use the "
                "weight form (edit.apply_to_weights)"
            )
        if self.per_writer and len(edits) > 1 and ad.is_moe:
            raise RefdirError(
                "per-row norm-preserving hooks need dense writers: score MoE trials one at a time"
            )
        for e in edits:
            if e.directions.shape[-1] != ad.d_model or e.n_layers != ad.n_layers:
                raise RefdirError(
                    f"edit is for {e.n_layers} layers of width {e.directions.shape[-1]}, the model has "
                    f"{ad.n_layers} of width {ad.d_model}"
                )
        self.sites: list[tuple[nn.Module, SiteTable]] = self._build(edits)

    def _build(self, edits: list[WeightedAblation]) -> list[tuple[nn.Module, SiteTable]]:
        ad = self.ad
        bases = [e.bases().double() for e in edits]  # [L, k, d] each
        k = max(b.shape[1] for b in bases)
        pad = [torch.cat([b, b.new_zeros(b.shape[0], k - b.shape[1], b.shape[2])], 1) for b in bases]
        coefs = {c: [e.coefficients(c) for e in edits] for c in ("attn", "mlp", "embed")}

        def coef_at(c: str, layer: int) -> torch.Tensor:  # [K, k]
            return torch.stack([torch.cat([x[layer], x.new_zeros(k - x.shape[1])]) for x in coefs[c]])

        sites: list[tuple[nn.Module, SiteTable]] = []
        plain = torch.tensor([e.norm == "none" for e in edits])  # [K]
        emb = coef_at("embed", 0)
        if emb.any():
            basis0 = torch.stack([p[0] for p in pad])
            for m in [ad.embed] + ([ad.pos_embed] if ad.pos_embed is not None else []):
                sites.append((m, SiteTable(basis0, emb)))
        for layer in range(ad.n_layers):
            basis = torch.stack([p[layer] for p in pad])  # [K, k, d]
            for comp, block in (("attn", ad.attn_write[layer]), ("mlp", ad.mlp_write[layer])):
                coef = coef_at(comp, layer)  # [K, k]
                # norm='none' edits act on the block's output (after any post-sublayer norm, as
                # directional ablation does); norm-keeping ones on each writer module (their scales)
                on_block, on_writers = coef * plain[:, None], coef * ~plain[:, None]
                if on_block.any():
                    sites.append((block, SiteTable(basis, on_block)))
                if on_writers.any():
                    for group in by_module(component_writers(ad, layer)[comp]):
                        sites.append((group[0].module, self._writer_table(group, basis, on_writers, edits)))
        return sites

    @staticmethod
    def _writer_table(
        group: list[ResidualWriter], basis: torch.Tensor, coef: torch.Tensor, edits: list[WeightedAblation]
    ) -> SiteTable:
        main = _module_weight(group)
        if main.tensor.device.type == "meta" or not main.tensor.is_floating_point():
            raise RefdirError(
                f"norm-keeping edits need {main.name}'s weights for their scales, but they are offloaded or "
                "quantized: score with norm='none' (refdir search --norms none)"
            )
        mat = as_matrix(main.tensor, main.axis)  # [d, in] float64, on the weight's device
        outs: list[torch.Tensor | None] = []
        ins: list[torch.Tensor | None] = []
        for t, e in enumerate(edits):  # scales kept on the CPU with the other tables, placed per pass
            s = channel_scales(mat, basis[t], coef[t], e.norm).cpu() if e.norm != "none" else None
            outs.append(s if e.norm == "output" else None)
            ins.append(s if e.norm == "input" else None)
        return SiteTable(basis, coef, _stack_or_none(outs, mat.shape[0]), _stack_or_none(ins, mat.shape[1]))

    @contextlib.contextmanager
    def active(self, rows: torch.Tensor) -> Iterator[None]:
        """The original rows (``[b]``, in batch order) that the passes inside this context hold."""
        saved, self._rows = self._rows, rows.cpu()
        self._clear()
        try:
            yield
        finally:
            self._rows = saved
            self._clear()

    @contextlib.contextmanager
    def serving(self, groups: torch.Tensor) -> Iterator[None]:
        """Hooks attached with batch row i running trial ``groups[i]`` (``[rows]``): the ``attach`` of
        :func:`~refdir.core.prefix.per_trial_last_logits`; the tables are built once for all trials."""
        saved = self.groups, self._rows
        self.groups, self._rows = groups.long().cpu(), torch.arange(len(groups))
        self._clear()
        try:
            with self.attached():
                yield
        finally:
            self.groups, self._rows = saved
            self._clear()

    def _clear(self) -> None:
        for _, table in self.sites:
            table.placed.clear()

    def _table(self, table: SiteTable, name: str, x: torch.Tensor) -> torch.Tensor | None:
        """The current rows' slice of one table on ``x``'s device: ``[k, ...]`` for one trial, else
        ``[b, 1, ...]`` broadcasting over positions."""
        key = (name, x.device, x.dtype)
        if key not in table.placed:
            full = getattr(table, name)
            if full is None:
                table.placed[key] = None
            elif full.shape[0] == 1:
                table.placed[key] = full[0].to(device=x.device, dtype=x.dtype)
            else:
                if x.dim() != 3 or x.shape[0] != len(self._rows):
                    raise RefdirError("per-row trial hooks need [batch, positions, d] activations")
                rows = full[self.groups[self._rows]]
                table.placed[key] = rows.to(device=x.device, dtype=x.dtype).unsqueeze(1)
        return table.placed[key]

    def _out(self, table: SiteTable, y: torch.Tensor) -> torch.Tensor:
        basis, coef = self._table(table, "basis", y), self._table(table, "coef", y)
        assert basis is not None and coef is not None
        if basis.dim() == 2:  # one trial: [k, d], [k]
            y = y - ((y @ basis.T) * coef) @ basis
        else:  # [b, 1, k, d], [b, 1, k]
            b = basis[:, 0]  # [b, k, d]
            c = torch.einsum("btd,bkd->btk", y, b) * coef
            y = y - torch.einsum("btk,bkd->btd", c, b)
        s = self._table(table, "out_scale", y)
        return y if s is None else y * s

    def _in(self, table: SiteTable, x: torch.Tensor) -> torch.Tensor:
        c = self._table(table, "in_scale", x)
        return x if c is None else x * c

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        """Install every site's hooks for the context (removed on exit)."""
        handles = []
        for module, table in self.sites:

            def post(mod: nn.Module, args: tuple[Any, ...], out: Any, table: SiteTable = table) -> Any:
                return replace_output(out, self._out(table, first_tensor(out)))

            handles.append(module.register_forward_hook(post))
            if table.in_scale is not None:

                def pre(mod: nn.Module, args: tuple[Any, ...], table: SiteTable = table) -> Any:
                    return (self._in(table, args[0]),) + tuple(args[1:])

                handles.append(module.register_forward_pre_hook(pre))
        with hooks(handles):
            yield
