"""Export of an :class:`~refdir.method.edits.Edit` other than the paper's: a search trial's weight edit.

Two ways, as for the paper's direction (:mod:`refdir.outputs.export`): in memory (edit the loaded model,
``save_pretrained``) and streamed (the checkpoint tensor by tensor, peak memory about one tensor, so a
70B trial exports on a machine that cannot load it). The streamed edit maps every checkpoint tensor to the
writer it came from (layer, attention or MLP, expert) and applies the same float64 arithmetic as
:meth:`WeightedAblation.apply_to_weights` (tested equal); a bias whose module keeps output norms reads its
weight once more for the scales.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from refdir import __version__
from refdir.core.errors import RefdirError
from refdir.core.io import atomic_dir
from refdir.core.types import Model, Tokenizer
from refdir.method.edits import Edit
from refdir.method.weighted import (
    WeightedAblation,
    as_matrix,
    channel_scales,
    component_writers,
    edit_bias,
    edit_matrix,
    is_bias,
    project,
)
from refdir.outputs.export import EditPlan, export_streaming


def export_edit(
    model: Model,
    tokenizer: Tokenizer,
    edit: Edit,
    out: str | Path,
    meta: dict,
    allow_approximate: bool = False,
) -> Path:
    """Write ``edit``'s weight form into ``model`` (in place) and save it with its tokenizer, atomically;
    ``refdir.json`` records ``meta`` (e.g. the search trial and its parameters) and the edit's kind."""
    exact = edit.exact_on(model)
    edit.apply_to_weights(model, allow_approximate)
    out = Path(out)
    try:
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp, max_shard_size="2GB")
            tokenizer.save_pretrained(tmp)
            info = {"refdir": __version__, **meta, "edit_kind": edit.kind, "exact": exact}
            (tmp / "refdir.json").write_text(json.dumps(info, indent=1) + "\n")
    except OSError as e:
        raise RefdirError(f"export to {out} failed: {e.strerror or e}; nothing was written") from None
    return out


def _edit_tensor(
    t: torch.Tensor, axis: int, basis: torch.Tensor, coef: torch.Tensor, norm: str
) -> torch.Tensor:
    """A weight ``[., .]`` or fused ``[E, ., .]`` (each expert alone), edited as in memory."""
    mats, ax = ([t], axis) if t.dim() == 2 else (list(t), axis - 1)
    out = []
    for m in mats:
        edited, _ = edit_matrix(as_matrix(m, ax), basis, coef, norm)
        out.append((edited if ax == 0 else edited.T).to(t.dtype))
    return out[0] if t.dim() == 2 else torch.stack(out)


def _bias_scales(w: torch.Tensor, axis: int, basis: torch.Tensor, coef: torch.Tensor) -> list[torch.Tensor]:
    """Output scales of a weight ``[., .]`` (one) or fused ``[E, ., .]`` (one per expert)."""
    mats, ax = ([w], axis) if w.dim() == 2 else (list(w), axis - 1)
    return [channel_scales(as_matrix(m, ax), basis, coef, "output") for m in mats]


def weighted_plan(edit: WeightedAblation, meta: dict) -> EditPlan:
    """The streamed form of ``edit``: for :func:`~refdir.outputs.export.export_streaming`'s ``edit_plan``."""

    def plan(model: Model, ad: Any, sources: dict) -> tuple[Callable, dict]:
        where = {
            id(w): (layer, comp)
            for layer in range(ad.n_layers)
            for comp, ws in component_writers(ad, layer).items()
            for w in ws
        }
        bases = edit.bases().double()  # [L, k, d]
        coefs = {c: edit.coefficients(c) for c in ("attn", "mlp", "embed")}
        weight_name = {
            (id(w.module), e): n for n, (w, e) in sources.items() if w is not None and not is_bias(w)
        }

        def transform(name: str, t: torch.Tensor, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
            w, e = sources[name]
            if w is None:  # token / position embedding [vocab, d]
                a = coefs["embed"][0]
                return t if not a.any() else project(t.double().T, bases[0], a).T.to(t.dtype)
            layer, comp = where[id(w)]
            basis, coef = bases[layer], coefs[comp][layer]
            if not coef.any():
                return t
            axis = w.axis if e is None else w.axis - 1  # a split expert has lost the expert axis
            if not is_bias(w):
                return _edit_tensor(t, axis, basis, coef, edit.norm)
            scales: list = []
            if edit.norm == "output":
                wn = weight_name[(id(w.module), e)]
                ww, we = sources[wn]
                scales = _bias_scales(read(wn), ww.axis if we is None else ww.axis - 1, basis, coef)
            rows = [t] if t.dim() == 1 else list(t)
            out = [
                edit_bias(b, basis, coef, scales[i] if scales else None).to(t.dtype)
                for i, b in enumerate(rows)
            ]
            return out[0] if t.dim() == 1 else torch.stack(out)

        return transform, {
            "refdir": __version__,
            **meta,
            "edit_kind": edit.kind,
            "exact": edit.exact_on(model),
        }

    return plan


def export_edit_streaming(
    spec: str, edit: WeightedAblation, out: str | Path, meta: dict, allow_approximate: bool = False, **kw: Any
) -> Path:
    """``edit`` applied to the checkpoint ``spec`` tensor by tensor into ``out`` (atomic)."""
    return export_streaming(
        spec, None, "", out, allow_approximate=allow_approximate, edit_plan=weighted_plan(edit, meta), **kw
    )
