"""Edits of a model along refusal directions, as values with two forms: hooks and weights.

An :class:`Edit` holds its parameters (a frozen dataclass that round-trips through JSON) and gives

* a *hook form* for evaluation (:meth:`Edit.hooks`: a context manager that always removes its hooks),
* a *weight form* for export (:meth:`Edit.apply_to_weights`: edits the loaded model in place), and
* whether the two are exactly equivalent on a model (:meth:`Edit.exact_on`, from the architecture adapter:
  families whose attention/MLP outputs pass through a norm before the residual stream are not).

Why one interface: variants of the edit (norm-preserving edits, per-layer strengths, interpolated or
rank-k directions) plug in as new subclasses, and every consumer (evaluation, export, the equivalence
check) handles them without knowing which one it holds. :func:`check_equivalence` measures how far the
two forms are apart on given inputs.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

from refdir.core.adapter import get_adapter
from refdir.core.errors import RefdirError
from refdir.core.types import Model
from refdir.method.interventions import (
    activation_addition,
    directional_ablation,
    orthogonalize_weights,
    orthonormal_basis,
    subspace_ablation,
)


def as_tensor(value: Any) -> torch.Tensor:
    """A tensor from a tensor, a :class:`~refdir.method.directions.Direction` (its ``vector``) or a list.

    Duck-typed on ``vector`` so this module needs no import of ``directions`` (which builds on it)."""
    value = getattr(value, "vector", value)
    return value.detach() if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=torch.float32)


def tensor_to_json(t: torch.Tensor) -> dict[str, Any]:
    """Exact JSON form of a tensor: its dtype and nested values (float32/64 survive ``repr`` exactly)."""
    return {"dtype": str(t.dtype).removeprefix("torch."), "data": t.detach().cpu().tolist()}


def tensor_from_json(obj: dict[str, Any]) -> torch.Tensor:
    dtype = getattr(torch, str(obj.get("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype) or "data" not in obj:
        raise RefdirError(f"not a tensor in edit JSON: {str(obj)[:80]}")
    return torch.tensor(obj["data"], dtype=dtype)


@dataclass(frozen=True, eq=False)
class Edit:
    """The interface every edit implements; subclasses are frozen dataclasses named by ``kind`` in JSON.

    ``tensor_fields`` names the fields holding tensors (stored with :func:`tensor_to_json`); the others
    must be JSON values already. ``has_weight_form`` is False for edits that exist only as hooks.
    """

    kind: ClassVar[str] = ""
    tensor_fields: ClassVar[tuple[str, ...]] = ()
    has_weight_form: ClassVar[bool] = True
    KINDS: ClassVar[dict[str, type[Edit]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            Edit.KINDS[cls.kind] = cls

    def __post_init__(self) -> None:
        for name in self.tensor_fields:  # frozen: normalize through object.__setattr__
            object.__setattr__(self, name, as_tensor(getattr(self, name)))

    def hooks(self, model: Model) -> contextlib.AbstractContextManager[None]:
        """The edit as forward hooks, removed on exit: what evaluation runs."""
        raise NotImplementedError

    def apply_to_weights(self, model: Model, allow_approximate: bool = False) -> Model:
        """The edit written into the weights, in place (returns ``model``): what export saves."""
        raise RefdirError(f"{type(self).__name__} has no weight form")

    def exact_on(self, model: Model) -> bool:
        """Whether the weight form equals the hook form on this model (up to float rounding): only when the
        attention/MLP writers add to the residual stream directly (no norm after them)."""
        return self.has_weight_form and get_adapter(model).linear_writes

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = tensor_to_json(v) if f.name in self.tensor_fields else v
        return out

    @staticmethod
    def from_json(data: dict[str, Any]) -> Edit:
        """The edit a :meth:`to_json` dict describes (its ``kind`` picks the class)."""
        cls = Edit.KINDS.get(str(data.get("kind")))
        if cls is None:
            raise RefdirError(
                f"unknown edit kind {data.get('kind')!r} (known: {', '.join(sorted(Edit.KINDS))})"
            )
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names - {"kind"})
        if unknown:
            raise RefdirError(f"{cls.kind}: unknown edit parameter '{unknown[0]}'")
        kw = {k: tensor_from_json(v) if k in cls.tensor_fields else v for k, v in data.items() if k != "kind"}
        return cls(**kw)


@dataclass(frozen=True, eq=False)
class DirectionalAblation(Edit):
    """Project r̂ out of every block input and every attention/MLP write (paper §2.4); as weights, paper
    Eq. 5 (:func:`~refdir.method.interventions.orthogonalize_weights`)."""

    direction: torch.Tensor  # [d], any norm (normalized where used)
    kind: ClassVar[str] = "directional_ablation"
    tensor_fields: ClassVar[tuple[str, ...]] = ("direction",)

    def hooks(self, model: Model) -> contextlib.AbstractContextManager[None]:
        return directional_ablation(model, self.direction)

    def apply_to_weights(self, model: Model, allow_approximate: bool = False) -> Model:
        return orthogonalize_weights(model, self.direction, allow_approximate)


@dataclass(frozen=True, eq=False)
class SubspaceAblation(Edit):
    """Project ``span(basis)`` out everywhere (a refusal cone of rank k, Wollschläger et al. 2025).

    The weight form orthogonalizes against each vector of the Gram-Schmidt basis in turn, as
    ``refdir export --rank k`` does with the cone's (already orthonormal) basis: successive projections
    equal the subspace's projection only when the vectors are orthonormal."""

    basis: torch.Tensor  # [k, d], any independent rows
    kind: ClassVar[str] = "subspace_ablation"
    tensor_fields: ClassVar[tuple[str, ...]] = ("basis",)

    def hooks(self, model: Model) -> contextlib.AbstractContextManager[None]:
        return subspace_ablation(model, self.basis)

    def apply_to_weights(self, model: Model, allow_approximate: bool = False) -> Model:
        d = self.basis.shape[-1]
        for v in orthonormal_basis(self.basis.reshape(-1, d)).float():  # [d] each
            orthogonalize_weights(model, v, allow_approximate)
        return model


@dataclass(frozen=True, eq=False)
class ActivationAddition(Edit):
    """Add ``coeff * vector`` (not normalized) to the residual stream entering ``layer``, at every
    position (paper §2.4). Hooks only: see :meth:`apply_to_weights`."""

    vector: torch.Tensor  # [d]
    layer: int
    coeff: float = 1.0
    kind: ClassVar[str] = "activation_addition"
    tensor_fields: ClassVar[tuple[str, ...]] = ("vector",)
    has_weight_form: ClassVar[bool] = False

    def hooks(self, model: Model) -> contextlib.AbstractContextManager[None]:
        return activation_addition(model, self.vector, self.layer, self.coeff)

    def apply_to_weights(self, model: Model, allow_approximate: bool = False) -> Model:
        raise RefdirError(
            "activation addition has no exact weight form: it adds a constant vector to the residual stream "
            f"entering layer {self.layer} at every position, and the layers' output projections have no "
            "bias to hold it (an added bias would change the architecture); use edit.hooks(model)"
        )


@torch.no_grad()
def check_equivalence(
    edit: Edit,
    model: Model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    allow_approximate: bool = False,
) -> float:
    """Max |logit difference| over every position and vocabulary entry between the hook form on
    ``model`` and the weight form on a deep copy of it (``model`` itself is left as it was).

    ``input_ids``/``attention_mask``: ``[B, T]``. Costs one extra copy of the weights."""
    kw = {"input_ids": input_ids, "attention_mask": attention_mask}
    with edit.hooks(model):
        hooked = model(**kw).logits.float()  # [B, T, vocab]
    edited = copy.deepcopy(model)
    edit.apply_to_weights(edited, allow_approximate)
    weighted = edited(**kw).logits.float()  # [B, T, vocab]
    del edited
    return float((hooked - weighted.to(hooked.device)).abs().max())
