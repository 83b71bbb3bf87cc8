"""Candidate refusal directions (difference of means) and the chosen-direction artifact.

``r[p, l] = mean_harmful[p, l] - mean_harmless[p, l]`` for every post-instruction position p and
layer l (paper Eq. 1). The chosen direction is saved as safetensors + JSON metadata, never pickle.
:class:`Direction` is also the value a notebook works with: it ablates, adds, orthogonalizes, moves,
saves and loads itself, through the :mod:`refdir.method.edits` it builds on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from refdir.core.errors import RefdirError
from refdir.core.io import atomic_path, load_tensors, save_tensors
from refdir.core.types import Model
from refdir.method.edits import ActivationAddition, DirectionalAblation
from refdir.run.folder import RunFolder


def candidate_directions(mean_harmful: torch.Tensor, mean_harmless: torch.Tensor) -> torch.Tensor:
    """Difference in means ``[n_post, n_layers, d]`` (float64 in, float32 out)."""
    if mean_harmful.shape != mean_harmless.shape:
        raise RefdirError(
            f"mean activations differ in shape: {tuple(mean_harmful.shape)} vs {tuple(mean_harmless.shape)}"
        )
    return (mean_harmful - mean_harmless).float()


@dataclass
class Direction:
    """The selected refusal direction r (un-normalized: its norm matters for activation addition)."""

    vector: torch.Tensor  # [d]
    layer: int
    pos: int  # post-instruction position counted from the end: -1 is the last template token
    model: str = ""
    scores: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # provenance: token, refusal tokens, sizes, seed, prompt format

    @property
    def d_model(self) -> int:
        return int(self.vector.shape[-1])

    @property
    def unit(self) -> torch.Tensor:
        return self.vector / self.vector.norm()

    def meta(self) -> dict:
        return {
            "model": self.model,
            "layer": self.layer,
            "position": self.pos,
            "pos": self.pos,
            "d_model": self.d_model,
            "norm": float(self.vector.norm()),
            **{k: self.scores[k] for k in ("bypass", "induce", "kl") if k in self.scores},
            "scores": self.scores,
            **self.extra,
            "format": 1,
        }

    def ablation(self) -> DirectionalAblation:
        """This direction's ablation as an :class:`~refdir.method.edits.Edit` (hooks, weights, JSON)."""
        return DirectionalAblation(self.vector)

    def addition(self, coeff: float = 1.0, layer: int | None = None) -> ActivationAddition:
        """Activation addition of ``coeff * vector`` as an :class:`~refdir.method.edits.Edit`, at this
        direction's own layer unless ``layer`` is given (the paper's placement)."""
        if layer is None:
            if self.layer < 0:
                raise RefdirError(
                    "this direction has no layer (a bare .pt vector): pass layer= to add it somewhere"
                )
            layer = self.layer
        return ActivationAddition(self.vector, layer, coeff)

    def ablate(self, model: Model) -> contextlib.AbstractContextManager[None]:
        """Directional ablation at every layer and position while the context is open (the hooks
        ``refdir evaluate --intervention ablate`` uses); removed on exit."""
        return self.ablation().hooks(model)

    def add(
        self, model: Model, coeff: float = 1.0, layer: int | None = None
    ) -> contextlib.AbstractContextManager[None]:
        """Activation addition (``coeff`` < 0 subtracts) while the context is open; removed on exit."""
        return self.addition(coeff, layer).hooks(model)

    def orthogonalize(self, model: Model, allow_approximate: bool = False) -> Model:
        """Edit ``model``'s weights in place so no component writes along r (paper Eq. 5); see
        :func:`~refdir.method.interventions.orthogonalize_weights`."""
        return self.ablation().apply_to_weights(model, allow_approximate)

    def to(self, device_or_dtype: torch.device | str | torch.dtype) -> Direction:
        """A new Direction whose vector lives on that device or has that dtype (metadata copied)."""
        return dataclasses.replace(
            self, vector=self.vector.to(device_or_dtype), scores=dict(self.scores), extra=dict(self.extra)
        )

    @classmethod
    def load(
        cls,
        path: str | Path | RunFolder,
        expect_d_model: int | None = None,
        expect_model: str | None = None,
    ) -> Direction:
        """A run folder's direction (or a ``.safetensors`` / ``.pt`` file), checked as
        :func:`load_direction` checks it."""
        return load_direction(path, expect_d_model, expect_model)

    def save(self, path: str | Path) -> None:
        """``direction.safetensors`` (the vector) + ``direction.json`` (its metadata) beside it."""
        path = Path(path)
        save_tensors(
            path.with_suffix(".safetensors"),
            {"direction": self.vector.float().cpu()},
            metadata={"model": self.model},
        )  # one key: safetensors orders keys arbitrarily
        with atomic_path(path.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps(self.meta(), indent=1) + "\n")


def load_subspace(run: str | Path, rank: int, expect_d_model: int | None = None) -> torch.Tensor:
    """The first ``rank`` rows ``[rank, d]`` of the orthonormal refusal-cone basis ``RUN/cone.safetensors``
    (``refdir cone``); rank 1 is the run's direction."""
    f = RunFolder(run).cone_basis
    if not f.is_file():
        raise RefdirError(
            f"{run} has no cone.safetensors: run `refdir cone --run {run}` first (or drop --rank)"
        )
    basis = load_tensors(f)["basis"]
    if not 1 <= rank <= basis.shape[0]:
        raise RefdirError(f"--rank {rank}: {f} holds ranks 1..{basis.shape[0]}")
    if expect_d_model is not None and basis.shape[1] != expect_d_model:
        raise RefdirError(f"the cone has size {basis.shape[1]} but the model's d_model is {expect_d_model}")
    return basis[:rank]


def load_direction(
    path: str | Path | RunFolder, expect_d_model: int | None = None, expect_model: str | None = None
) -> Direction:
    """Load a direction from a run folder, a ``.safetensors`` file, or a reference-code ``.pt``.

    ``.pt`` files are read with ``torch.load(weights_only=True)`` (no pickle code runs).
    """
    if isinstance(path, RunFolder):
        path = path.path
    p = Path(path)
    if p.is_dir():
        p = RunFolder(p).direction
    meta: dict = {}
    if p.suffix == ".pt":
        try:
            vec = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:
            raise RefdirError(
                f"cannot read {p.name} as a plain tensor: {str(e).splitlines()[0][:160]}"
            ) from None
        if not isinstance(vec, torch.Tensor):
            raise RefdirError(f"{p.name} does not hold a single tensor")
        layer, pos = -1, -1
    else:
        if not p.is_file():
            raise RefdirError(f"direction not found: {path} (expected a run folder or a .safetensors file)")
        try:
            vec = load_tensors(p)["direction"]
        except Exception as e:
            raise RefdirError(f"cannot read direction file {p}: {str(e)[:160]}") from None
        jp = p.with_suffix(".json")
        if jp.is_file():
            try:
                meta = json.loads(jp.read_text())
            except json.JSONDecodeError as e:
                raise RefdirError(f"{jp}: malformed JSON at line {e.lineno}") from None
            if int(meta.get("format", 1)) > 1:
                raise RefdirError(
                    f"{jp} was written by a newer refdir (format {meta['format']}); upgrade refdir"
                )
        layer, pos = int(meta.get("layer", -1)), int(meta.get("pos", -1))
    vec = vec.float().flatten()
    if not torch.isfinite(vec).all():
        raise RefdirError(f"direction in {p} contains NaN or inf")
    if float(vec.norm()) == 0.0:
        raise RefdirError(f"direction in {p} has zero norm")
    if expect_d_model is not None and vec.numel() != expect_d_model:
        raise RefdirError(
            f"direction in {p} has size {vec.numel()} but the model's d_model is {expect_d_model}"
        )
    if expect_model and meta.get("model") and meta["model"] != expect_model:
        raise RefdirError(f"direction in {p} was computed on model '{meta['model']}', not '{expect_model}'")
    known = {
        "model",
        "layer",
        "position",
        "pos",
        "d_model",
        "norm",
        "bypass",
        "induce",
        "kl",
        "scores",
        "format",
    }
    return Direction(
        vec,
        layer,
        pos,
        meta.get("model", ""),
        meta.get("scores", {}),
        {k: v for k, v in meta.items() if k not in known},
    )


def direction_from_candidates(
    candidates: torch.Tensor, pos_index: int, layer: int, model: str = "", scores: dict | None = None
) -> Direction:
    """Pick ``candidates[pos_index, layer]`` as a :class:`Direction` (pos stored counted from the end)."""
    n_post = candidates.shape[0]
    return Direction(
        candidates[pos_index, layer].clone(), layer, pos_index - n_post, model, dict(scores or {})
    )
