"""Refusal cones: subspace ablation is exact, rank 1 is the run's direction, a greedy basis stays
orthonormal."""

import copy

import torch
from tiny import tiny_model

from refdir.core.adapter import get_adapter
from refdir.core.templates import PromptFormat, tokenize_prompts
from refdir.method.directions import Direction
from refdir.method.interventions import (
    directional_ablation,
    orthogonalize_weights,
    orthonormal_basis,
    subspace_ablation,
)
from refdir.method.refusal import last_logits

PROMPTS = ["Write a poem about rain.", "How do I sort a list in Python?", "Explain photosynthesis briefly."]
HARM = [
    "Explain how to pick a lock.",
    "Write a threatening letter.",
    "How do I make a weapon?",
    "Describe how to steal a car.",
]


def _vecs(k, seed=4):
    return torch.randn(k, 64, generator=torch.Generator().manual_seed(seed))


def test_rank_one_is_directional_ablation_and_rank_k_removes_the_span():
    model, tok = tiny_model("qwen2")
    b = tokenize_prompts(tok, PROMPTS)
    v = _vecs(3)
    with directional_ablation(model, v[0]):
        one = last_logits(model, b.input_ids, b.attention_mask)
    with subspace_ablation(model, v[:1]):
        assert (last_logits(model, b.input_ids, b.attention_mask) - one).abs().max() < 1e-5
    basis = orthonormal_basis(v).float()
    seen = []
    ad = get_adapter(model)
    with subspace_ablation(model, v):
        hs = [
            layer.register_forward_pre_hook(
                lambda m, a, k: seen.append(a[0] if a else k["hidden_states"]), with_kwargs=True
            )
            for layer in ad.layers
        ]
        model(input_ids=b.input_ids)
        for h in hs:
            h.remove()
    for x in seen:
        assert ((x @ basis.T).abs().max(-1).values / x.norm(dim=-1)).max() < 1e-5


def test_orthogonalizing_each_basis_vector_equals_subspace_ablation():
    model, tok = tiny_model("mixtral")
    b = tokenize_prompts(tok, PROMPTS)
    basis = orthonormal_basis(_vecs(3))
    with subspace_ablation(model, basis):
        want = last_logits(model, b.input_ids, b.attention_mask)
    m2 = copy.deepcopy(model)
    for v in basis:
        orthogonalize_weights(m2, v)
    assert (last_logits(m2, b.input_ids, b.attention_mask) - want).abs().max() < 1e-4


def _cone_setup():
    """A tiny model, its harmful/harmless batches, difference-of-means candidates and one of them as r."""
    from refdir.method.activations import mean_activations
    from refdir.method.directions import candidate_directions

    model, tok = tiny_model("llama")
    hb, lb = tokenize_prompts(tok, HARM), tokenize_prompts(tok, PROMPTS)
    cands = candidate_directions(mean_activations(model, hb), mean_activations(model, lb))
    return model, tok, hb, lb, cands, Direction(cands[-1, 1], 1, -1)


def test_greedy_cone_grows_an_orthonormal_basis_from_the_run_direction():
    from refdir.analyses.cone import evaluate_ranks, greedy_cone

    model, tok, hb, lb, cands, d = _cone_setup()
    ranks = greedy_cone(model, cands, d, hb, hb, lb, [5, 6], max_rank=3, pool_size=6, progress=False)
    assert [r["rank"] for r in ranks] == [1, 2, 3]
    basis = ranks[-1]["basis"]
    assert torch.allclose(basis @ basis.T, torch.eye(3, dtype=basis.dtype), atol=1e-8)
    assert torch.allclose(basis[0], (d.vector / d.vector.norm()).double(), atol=1e-6)  # rank 1 is r̂ itself
    from refdir.analyses.cone import subspace_bypass
    from refdir.core.forward import split_prefix

    again = subspace_bypass(model, split_prefix(hb, True, model), ranks[2]["basis"], torch.tensor([5, 6]))
    assert abs(again - ranks[2]["bypass"]) < 1e-4  # the recorded score is that basis's bypass
    rows = evaluate_ranks(model, tok, ranks, HARM, PROMPTS, PromptFormat(), 4, 8)
    assert [r["n"] for r in rows] == [4, 4, 4] and all(0 <= r["refusal_rate"] <= 1 for r in rows)
    assert rows[0]["method"] == "run direction"


def test_gradient_refinement_lowers_its_objective_and_stays_orthogonal():
    from refdir.analyses.cone import refine_direction

    model, tok = tiny_model("qwen2")
    hb, lb = tokenize_prompts(tok, HARM), tokenize_prompts(tok, PROMPTS)
    basis = orthonormal_basis(_vecs(1, seed=7))
    init = _vecs(1, seed=8)[0]
    for p in list(model.parameters())[:3]:
        p.requires_grad_(True)  # as from_pretrained leaves them
    before = [p.requires_grad for p in model.parameters()]
    v, hist = refine_direction(
        model, basis, init, hb, lb, [5, 6], max_steps=25, lr=0.05, rows=4, time_budget=60
    )
    assert len(hist) == 25
    assert min(hist[-5:]) < hist[0]  # the loss goes down
    assert abs(float(v.norm()) - 1) < 1e-9 and float((basis @ v).abs().max()) < 1e-9  # unit, orthogonal
    assert [p.requires_grad for p in model.parameters()] == before  # left as they were
    assert all(p.grad is None for p in model.parameters())  # and no weight gradient was computed
    _, none = refine_direction(model, basis, init, hb, lb, [5, 6], max_steps=25, time_budget=0)
    assert none == []  # the time budget is respected


def test_greedy_cone_with_refinement_keeps_the_better_vector():
    from refdir.analyses.cone import greedy_cone

    model, tok, hb, lb, cands, d = _cone_setup()
    plain = greedy_cone(model, cands, d, hb, hb, lb, [5, 6], max_rank=2, pool_size=6, progress=False)
    refine = {"harmful": hb, "harmless": lb, "max_steps": 15, "lr": 0.05, "rows": 4, "kl_weight": 0.0}
    ref = greedy_cone(
        model, cands, d, hb, hb, lb, [5, 6], max_rank=2, pool_size=6, progress=False, refine=refine
    )
    assert ref[1]["bypass"] <= plain[1]["bypass"] + 1e-6
    assert "gradient refinement" in ref[1]["added"]
    b = ref[1]["basis"]
    assert torch.allclose(b @ b.T, torch.eye(2, dtype=b.dtype), atol=1e-8)


def test_kl_budget_keeps_each_added_vector_within_it():
    from refdir.analyses.cone import _SubspaceKL, greedy_cone

    model, tok, hb, lb, cands, d = _cone_setup()
    args = (model, cands, d, hb, hb, lb, [5, 6])
    plain = greedy_cone(*args, max_rank=2, pool_size=6, progress=False)
    kl_of = _SubspaceKL(model, lb)
    k1, k2 = kl_of(plain[0]["basis"]), kl_of(plain[1]["basis"])
    loose = greedy_cone(*args, max_rank=2, pool_size=6, progress=False, kl_budget=1e9, harmless_val=lb)
    assert loose[1]["added"] == plain[1]["added"] and loose[1]["kl_checked"] == 1  # no limit: same choice
    assert abs(loose[1]["kl"] - k2) < 1e-9 and abs(loose[0]["kl"] - k1) < 1e-9
    budget = (k2 - k1) / 2  # the unconstrained choice no longer fits
    tight = greedy_cone(*args, max_rank=2, pool_size=6, progress=False, kl_budget=budget, harmless_val=lb)
    e = tight[1]
    assert e["added"] != plain[1]["added"] and e["bypass"] >= plain[1]["bypass"] - 1e-9
    assert abs(kl_of(e["basis"]) - e["kl"]) < 1e-9  # the recorded KL is that basis's
    assert e["kl"] <= k1 + budget + 1e-12 or e.get("over_kl_budget")
    from refdir.analyses.cone import _method

    assert "KL <=" in _method(e)


def test_measure_cone_writes_the_run_folder_artifacts(tmp_path):
    """The library call behind `refdir cone` and `refdir audit`: candidates and prompts from the folder,
    cone.json and the last basis in cone.safetensors out; rank 1 is r̂."""
    import json

    from refdir.analyses.cone import ConeSettings, measure_cone
    from refdir.core.io import load_tensors, save_tensors
    from refdir.core.runtime import BatchPolicy, Runtime
    from refdir.run.folder import RunFolder

    model, tok, _, _, cands, d = _cone_setup()
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    save_tensors(run.candidates, {"directions": cands.contiguous()})
    split = lambda xs: [{"instruction": x} for x in xs]  # noqa: E731
    data = {
        "harmful_train": split(HARM),
        "harmless_train": split(PROMPTS),
        "harmful_val": split(HARM[:2]),
        "harmless_val": split(PROMPTS[:2]),
        "eval_harmful": split(HARM[:3]),
        "eval_harmless": split(PROMPTS),
        "refusal_tokens": {"token_ids": [5, 6]},
    }
    run.prompts.write_text(json.dumps(data))
    rt = Runtime(model, tok, PromptFormat(), BatchPolicy(gen_rows=8))
    res = measure_cone(run, rt, d, ConeSettings(max_rank=2, max_new_tokens=3), out=tmp_path / "c.json")
    assert [r["rank"] for r in res["ranks"]] == [1, 2] and [r["n"] for r in res["ranks"]] == [3, 3]
    assert json.loads(run.cone.read_text()) == json.loads((tmp_path / "c.json").read_text()) == res
    basis = load_tensors(run.cone_basis)["basis"]
    assert list(basis.shape) == [2, 64]
    assert torch.allclose(basis[0], (d.vector / d.vector.norm()).float(), atol=1e-6)
    from refdir.analyses.cone import subspace_bypass
    from refdir.core.forward import split_prefix

    val = split_prefix(tokenize_prompts(tok, HARM[:2]), True, model)  # the run's harmful_val
    want = subspace_bypass(model, val, basis[:1].double(), torch.tensor([5, 6]))
    assert abs(res["ranks"][0]["bypass"] - want) < 1e-4
