"""Edits: the weight form equals the hook form on every dense and MoE family with linear writes, the
equivalence check measures it, JSON round-trips exactly, and Direction's methods are the same edits."""

import copy
import json

import pytest
import torch
from tiny import tiny_model

from refdir.core.adapter import get_adapter
from refdir.core.errors import RefdirError
from refdir.core.templates import tokenize_prompts
from refdir.evaluation.conditions import condition
from refdir.method.directions import Direction, load_direction
from refdir.method.edits import (
    ActivationAddition,
    DirectionalAblation,
    Edit,
    SubspaceAblation,
    check_equivalence,
)
from refdir.method.interventions import orthonormal_basis, subspace_ablation
from refdir.method.refusal import last_logits

PROMPTS = ["Write a poem about rain.", "How do I sort a list in Python?", "Explain photosynthesis briefly."]


def _vectors(k: int, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, 64, generator=g)  # [k, d]


def _edits() -> dict[str, Edit]:
    v = _vectors(3)
    return {
        "ablation": DirectionalAblation(v[0]),
        "subspace": SubspaceAblation(v[:2] + 0.5 * v[0]),  # not orthogonal: the weight form orthonormalizes
    }


@pytest.mark.parametrize("which", ["ablation", "subspace"])
def test_weight_form_equals_hook_form(family, which):
    """Dense and MoE families alike: 1e-4 where the writers write the residual stream directly; elsewhere
    ``exact_on`` says no and the weight form refuses unless approximate edits are allowed."""
    model, tok = tiny_model(family)
    edit = _edits()[which]
    b = tokenize_prompts(tok, PROMPTS)
    base = last_logits(model, b.input_ids, b.attention_mask)
    assert edit.exact_on(model) == get_adapter(model).linear_writes
    if not edit.exact_on(model):
        with pytest.raises(RefdirError, match="allow-approximate"):
            edit.apply_to_weights(copy.deepcopy(model))
        return
    diff = check_equivalence(edit, model, b.input_ids, b.attention_mask)
    assert diff < 1e-4
    with edit.hooks(model):
        hooked = last_logits(model, b.input_ids, b.attention_mask)
    assert (hooked - base).abs().max() > 1e-3  # the edit did something
    assert torch.equal(base, last_logits(model, b.input_ids, b.attention_mask))  # model left as it was


def test_subspace_weight_form_matches_export_order_on_an_orthonormal_basis():
    """On an orthonormal basis (the cone's), orthogonalizing vector by vector (``refdir export --rank``)
    equals the subspace's hook form; a non-orthonormal one gives the same edit as its Gram-Schmidt basis."""
    model, tok = tiny_model("qwen2_moe")
    b = tokenize_prompts(tok, PROMPTS)
    raw = _vectors(3)
    ortho = orthonormal_basis(raw).float()  # [3, d]
    with subspace_ablation(model, ortho):
        hooked = last_logits(model, b.input_ids, b.attention_mask)
    for basis in (ortho, raw):
        m = copy.deepcopy(model)
        SubspaceAblation(basis).apply_to_weights(m)
        assert (last_logits(m, b.input_ids, b.attention_mask) - hooked).abs().max() < 1e-4


def test_activation_addition_has_hooks_only():
    model, tok = tiny_model("llama")
    b = tokenize_prompts(tok, PROMPTS)
    v = _vectors(1)[0]
    edit = ActivationAddition(v, 2, -1.5)
    assert edit.exact_on(model) is False
    with pytest.raises(RefdirError, match="no exact weight form"):
        edit.apply_to_weights(model)
    with pytest.raises(RefdirError, match="no exact weight form"):
        check_equivalence(edit, model, b.input_ids)
    d = Direction(v, 2, -1)
    with edit.hooks(model):
        via_edit = last_logits(model, b.input_ids, b.attention_mask)
    with condition(model, "actadd-", d, 1.5):
        via_condition = last_logits(model, b.input_ids, b.attention_mask)
    assert torch.equal(via_edit, via_condition)


@pytest.mark.parametrize(
    "edit",
    [
        DirectionalAblation(_vectors(1)[0]),
        SubspaceAblation(_vectors(2)),
        ActivationAddition(_vectors(1)[0].double(), 3, 0.25),
    ],
    ids=["ablation", "subspace", "addition"],
)
def test_json_round_trip_is_exact(edit):
    text = json.dumps(edit.to_json())
    back = Edit.from_json(json.loads(text))
    assert type(back) is type(edit)
    for f in edit.tensor_fields:
        a, b = getattr(edit, f), getattr(back, f)
        assert a.dtype == b.dtype and torch.equal(a, b)
    plain = {k: v for k, v in edit.to_json().items() if k not in edit.tensor_fields}
    assert {k: v for k, v in back.to_json().items() if k not in edit.tensor_fields} == plain


def test_from_json_rejects_unknown_kinds_and_parameters():
    with pytest.raises(RefdirError, match="unknown edit kind 'shear'"):
        Edit.from_json({"kind": "shear"})
    data = DirectionalAblation(_vectors(1)[0]).to_json()
    with pytest.raises(RefdirError, match="unknown edit parameter 'strength'"):
        Edit.from_json({**data, "strength": 2.0})


def test_direction_methods_are_the_evaluation_conditions(tmp_path):
    """``Direction.ablate`` / ``.add`` give the logits of the conditions ``refdir evaluate`` runs, and
    ``.orthogonalize`` those of ablation; ``.to`` and ``.load`` keep the metadata."""
    model, tok = tiny_model("qwen2")
    b = tokenize_prompts(tok, PROMPTS)
    d = Direction(_vectors(1)[0], 2, -1, "tiny-qwen2", {"bypass": -1.25}, {"token": "x"})
    runs = {}
    for name, ctx in (
        ("ablation", d.ablate(model)),
        ("actadd+", d.add(model)),
        ("actadd-", d.add(model, -1.0)),
    ):
        with ctx:
            runs[name] = last_logits(model, b.input_ids, b.attention_mask)
    for name, got in runs.items():
        with condition(model, name, d):
            assert torch.equal(got, last_logits(model, b.input_ids, b.attention_mask))
    with d.add(model, 1.0, layer=0):
        assert not torch.equal(runs["actadd+"], last_logits(model, b.input_ids, b.attention_mask))
    assert torch.equal(DirectionalAblation(d).direction, d.vector)  # an Edit takes a Direction as it is
    assert d.addition(0.5).to_json() == ActivationAddition(d.vector, 2, 0.5).to_json()
    m = copy.deepcopy(model)
    assert d.orthogonalize(m) is m
    assert (last_logits(m, b.input_ids, b.attention_mask) - runs["ablation"]).abs().max() < 1e-4
    half = d.to(torch.float64)
    assert half.vector.dtype == torch.float64 and d.vector.dtype == torch.float32
    assert (half.layer, half.pos, half.scores, half.extra) == (d.layer, d.pos, d.scores, d.extra)
    assert half.scores is not d.scores
    d.save(tmp_path / "direction")
    for loaded in (Direction.load(tmp_path / "direction.safetensors"), load_direction(tmp_path)):
        assert torch.equal(loaded.vector, d.vector)
        assert (loaded.layer, loaded.pos, loaded.scores, loaded.extra) == (2, -1, {"bypass": -1.25}, d.extra)
    with pytest.raises(RefdirError, match="d_model"):
        Direction.load(tmp_path, expect_d_model=65)
    with pytest.raises(RefdirError, match="no layer"):
        Direction(d.vector, -1, -1).add(model)
