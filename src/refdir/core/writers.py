"""Residual writers: every parameter whose output space is the residual stream, and r̂ projected out of it.

Weight orthogonalization edits each of them (:class:`ResidualWriter`): the attention output projection,
the MLP down projection, every routed expert's down projection — per-expert ``nn.Linear`` modules or fused
3-D parameters ``[E, d_model, ff]`` / ``[E, ff, d_model]`` — shared experts, and their biases. They are
found by name and shape here; :mod:`refdir.core.adapter` then checks numerically, for each kind of decoder
layer, that editing them equals projecting the blocks' outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from refdir.core.errors import RefdirError

# Names under which transformers models keep output projections (a vocabulary, not a family table).
ATTN_OUT_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "wo", "out")
MLP_OUT_NAMES = ("down_proj", "fc2", "c_proj", "dense_4h_to_h", "w2", "fc_out", "wo", "proj_out")
# Fused expert parameters ([E, ., .]) whose name contains one of these write the residual stream.
EXPERT_OUT_WORDS = ("down", "w2", "wo", "output")


def out_features(m: nn.Module) -> int | None:
    """Output width of a 2-D projection (Linear or Conv1D), None for other modules."""
    w = getattr(m, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        return None
    if isinstance(m, nn.Linear):
        return m.out_features
    return w.shape[1]  # transformers' Conv1D stores weight as [in, out]


def is_linear_like(m: nn.Module) -> bool:
    """Linear or transformers' Conv1D (GPT-2 style): the modules that can be an output projection."""
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


@dataclass
class ResidualWriter:
    """A parameter whose output space is the residual stream: r̂ is projected out of its ``axis``."""

    name: str  # full parameter name (state-dict key), e.g. model.layers.3.mlp.experts.down_proj
    module: nn.Module
    attr: str  # the attribute of ``module`` that holds it ("weight", "bias", "down_proj", ...)
    axis: int  # the axis of size d_model: 0 of Linear [d, in], 1 of [E, d, ff], 2 of [E, ff, d]
    ambiguous: bool = False  # a fused [E, d, d] parameter: the layout was settled by the numeric check

    @property
    def tensor(self) -> torch.Tensor:
        return getattr(self.module, self.attr)

    def to_json(self) -> dict:
        return {"name": self.name, "axis": self.axis, "shape": list(self.tensor.shape)}


def linear_writers(module: nn.Module, name: str) -> list[ResidualWriter]:
    """The weight (and bias) of a Linear/Conv1D writer; ``name`` is the module's full name."""
    out = [ResidualWriter(f"{name}.weight", module, "weight", 0 if isinstance(module, nn.Linear) else 1)]
    if getattr(module, "bias", None) is not None:
        out.append(ResidualWriter(f"{name}.bias", module, "bias", 0))
    return out


def mlp_writers(mlp: nn.Module, name: str, d_model: int) -> list[ResidualWriter]:
    """Every residual writer of an MLP or mixture-of-experts block (``name``: its full module name).

    Linear/Conv1D modules named like output projections and writing ``d_model`` features (the dense
    down projection, each per-expert Linear, shared experts), and fused expert parameters ``[E, ., .]``
    named like one (``experts.down_proj``) with their ``[E, d]`` biases. The numeric check in
    :func:`~refdir.core.adapter.check_writers` then proves the set complete for each kind of layer.
    """
    found: list[ResidualWriter] = []
    for sub, m in mlp.named_modules():
        full = f"{name}.{sub}" if sub else name
        if sub and is_linear_like(m) and out_features(m) == d_model and sub.split(".")[-1] in MLP_OUT_NAMES:
            found += linear_writers(m, full)
            continue
        for pname, p in m.named_parameters(recurse=False):
            low = pname.lower()
            if not any(w in low for w in EXPERT_OUT_WORDS):
                continue
            if p.dim() == 3 and d_model in p.shape[1:]:
                axis = 1 if p.shape[1] == d_model else 2  # [E, d, ff] (Linear layout) or [E, ff, d]
                found.append(
                    ResidualWriter(f"{full}.{pname}", m, pname, axis, ambiguous=p.shape[1] == p.shape[2])
                )
            elif p.dim() == 2 and low.endswith("bias") and p.shape[1] == d_model:
                found.append(ResidualWriter(f"{full}.{pname}", m, pname, 1))  # [E, d] bias of fused experts
    if not found:
        raise RefdirError(
            f"unsupported architecture: no MLP output projection "
            f"(one of {', '.join(MLP_OUT_NAMES)} writing {d_model} features, or fused expert "
            f"parameters) in {type(mlp).__name__}"
        )
    return found


def project_out_axis_(t: torch.Tensor, unit: torch.Tensor, axis: int, block: int = 4096) -> None:
    """In place: t <- t with r̂ projected out of ``axis`` (the d_model axis), in float64 blocks.

    2-D ``[d, in]`` (axis 0): W - r̂(r̂ᵀW); ``[n, d]`` (axis 1): W - (Wr̂)r̂ᵀ; 1-D bias: b - (b·r̂)r̂;
    a leading expert axis is walked one expert at a time. Blocks of 4096 rows/columns keep the float64
    copy small (a whole [vocab, d] embedding in float64 would take GBs).
    """
    if t.dim() > 2:
        if axis == 0:
            raise RefdirError("cannot project along the expert axis of a fused parameter")
        for e in range(t.shape[0]):
            project_out_axis_(t[e], unit, axis - 1, block)
        return
    u = unit.to(device=t.device, dtype=torch.float64)
    if t.dim() == 1:
        b = t.double()
        t.copy_((b - (b @ u) * u).to(t.dtype))
    elif axis == 0:  # [d, in]: column blocks
        for i in range(0, t.shape[1], block):
            blk = t[:, i : i + block].double()
            blk -= torch.outer(u, u @ blk)
            t[:, i : i + block].copy_(blk.to(t.dtype))
    else:  # [n, d]: row blocks
        for i in range(0, t.shape[0], block):
            blk = t[i : i + block].double()
            blk -= torch.outer(blk @ u, u)
            t[i : i + block].copy_(blk.to(t.dtype))
