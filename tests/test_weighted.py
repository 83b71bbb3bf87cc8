"""WeightedAblation: the weight form equals the hook form wherever ``exact_on`` says so (every family, every
norm), the weights are what the docstring says (``P W``, ``diag(s) P W``, ``P W diag(c)``, channel norms
kept, per expert on fused MoE), the paper's point is the paper's ablation, one batch serving several
edits row by row gives each row what its edit alone gives, and JSON round-trips exactly."""

import copy
import functools
import json

import pytest
import torch
from tiny import tiny_model

from refdir.core.adapter import get_adapter
from refdir.core.errors import RefdirError
from refdir.core.templates import tokenize_prompts
from refdir.core.writers import ResidualWriter
from refdir.method.edits import DirectionalAblation, Edit, SubspaceAblation, check_equivalence
from refdir.method.refusal import last_logits
from refdir.method.weighted import NORMS, TrialRows, WeightedAblation

PROMPTS = [
    "Write a poem about rain.",
    "How do I sort a list in Python?",
    "Explain photosynthesis briefly.",
    "Name three rivers in Europe.",
    "What is a prime number?",
    "Give me a recipe for bread.",
]
ATTN = [1.0, 0.5, 1.3, 0.0]  # tiny models have 4 layers; layer 3's attention is left alone
MLP = [0.2, 1.0, 0.8, 1.5]


def _vectors(k: int, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, 64, generator=g)  # [k, d]


def _per_layer(seed: int = 5) -> torch.Tensor:
    """``[L, 1, d]`` with layer 0's row zero (left unedited)."""
    dirs = _vectors(4, seed)[:, None].clone()
    dirs[0] = 0
    return dirs


def _shapes() -> dict[str, dict]:
    return {
        "rank1": {"directions": _vectors(1)[0]},
        "rank2": {"directions": _vectors(2, 7) + 0.3 * _vectors(1)[0], "vector_strengths": [1.0, 0.5]},
        "per_layer": {"directions": _per_layer()},
    }


def _weighted(norm: str, shape: str = "rank1", **kw) -> WeightedAblation:
    return WeightedAblation(
        **{"attn": ATTN, "mlp": MLP, "embed": 0.7, "norm": norm, **_shapes()[shape], **kw}
    )


@functools.cache
def _model(family: str):
    """One model per family for the whole module (its adapter's numeric checks run once); tests edit
    copies of it and remove their hooks."""
    return tiny_model(family)


def _fused(model) -> bool:
    return any(w.tensor.dim() == 3 for w in get_adapter(model).all_writers())


def _logits(model, b) -> torch.Tensor:
    return last_logits(model, b.input_ids, b.attention_mask)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("shape", ["rank1", "rank2", "per_layer"])
def test_weight_form_equals_hook_form(family, norm, shape):
    """1e-4 where ``exact_on``; elsewhere the hook form refuses norms on fused experts and the weight form
    refuses post-norm families without ``allow_approximate``."""
    model, tok = _model(family)
    ad = get_adapter(model)
    edit = _weighted(norm, shape)
    b = tokenize_prompts(tok, PROMPTS[:3])
    base = _logits(model, b)
    fused = _fused(model)
    assert edit.exact_on(model) == (ad.linear_writes and not (fused and norm != "none"))
    if fused and norm != "none":
        with pytest.raises(RefdirError, match="fused experts"):
            edit.hooks(model)
        edited = edit.apply_to_weights(copy.deepcopy(model))  # the weight form exists
        assert (_logits(edited, b) - base).abs().max() > 1e-3
        return
    with edit.hooks(model):
        hooked = _logits(model, b)
    assert (hooked - base).abs().max() > 1e-3  # the edit did something
    assert torch.equal(base, _logits(model, b))  # hooks removed
    if not ad.linear_writes:
        with pytest.raises(RefdirError, match="allow-approximate"):
            edit.apply_to_weights(copy.deepcopy(model))
        return
    assert edit.exact_on(model)
    assert check_equivalence(edit, model, b.input_ids, b.attention_mask) < 1e-4


def test_tied_embeddings_are_untied_by_the_weight_form():
    model, tok = tiny_model("llama", tie=True)
    b = tokenize_prompts(tok, PROMPTS[:3])
    edit = _weighted("output")
    assert check_equivalence(edit, model, b.input_ids, b.attention_mask) < 1e-4
    head = model.lm_head.weight.clone()
    edit.apply_to_weights(model)
    assert torch.equal(model.lm_head.weight, head)  # the unembedding keeps the original matrix
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_zero_layer_row_is_left_unedited():
    """A per-layer edit whose layer-0 row is zero equals one with any layer-0 row and zero strength there
    (embeddings included: they use layer 0's basis); layer 0's weights and the embeddings stay as they are."""
    model, tok = _model("llama")
    b = tokenize_prompts(tok, PROMPTS[:3])
    edit = _weighted("output", "per_layer")
    assert torch.equal(edit.bases()[0], torch.zeros(1, 64))
    other = _per_layer()
    other[0] = _vectors(1, 11)
    same = WeightedAblation(other, [0.0, *ATTN[1:]], [0.0, *MLP[1:]], embed=0.0, norm="output")
    with edit.hooks(model):
        a = _logits(model, b)
    with same.hooks(model):
        assert (_logits(model, b) - a).abs().max() < 1e-6
    m = edit.apply_to_weights(copy.deepcopy(model))
    ad, ad0 = get_adapter(m), get_adapter(model)
    assert torch.equal(ad.embed.weight, ad0.embed.weight)
    for w, w0 in zip(ad.writers[0], ad0.writers[0]):
        assert torch.equal(w.tensor, w0.tensor)
    assert not torch.equal(ad.writers[1][0].tensor, ad0.writers[1][0].tensor)


def test_per_layer_copies_of_one_direction_equal_the_global_direction():
    model, tok = _model("qwen2")
    b = tokenize_prompts(tok, PROMPTS[:3])
    v = _vectors(1)[0]
    with _weighted("input").hooks(model):
        a = _logits(model, b)
    with _weighted("input", directions=v.expand(4, 1, 64).clone()).hooks(model):
        assert (_logits(model, b) - a).abs().max() < 1e-5


def test_paper_point_equals_directional_ablation(family):
    """``paper(v, L)``: every writer and the embeddings at strength 1, i.e. the paper's ablation (on
    post-norm families too: the hooks sit on what is added to the residual stream, so no block reads r)."""
    model, tok = _model(family)
    b = tokenize_prompts(tok, PROMPTS[:3])
    v = _vectors(1)[0]
    paper = WeightedAblation.paper(v, 4)
    assert (paper.attn, paper.mlp, paper.embed, paper.norm) == ([1.0] * 4, [1.0] * 4, 1.0, "none")
    with paper.hooks(model):
        got = _logits(model, b)
    with DirectionalAblation(v).hooks(model):
        want = _logits(model, b)
    assert (got - want).abs().max() < 1e-4
    assert (got - _logits(model, b)).abs().max() > 1e-3


def test_full_strength_rank2_equals_subspace_ablation():
    model, tok = _model("mixtral")
    b = tokenize_prompts(tok, PROMPTS[:3])
    dirs = _shapes()["rank2"]["directions"]
    with WeightedAblation(dirs, [1.0] * 4, [1.0] * 4, embed=1.0).hooks(model):
        got = _logits(model, b)
    with SubspaceAblation(dirs).hooks(model):
        assert (_logits(model, b) - got).abs().max() < 1e-4


# ------------------------------------------------------------------------------------------------
# the weights themselves


def _mats(w: ResidualWriter) -> list[torch.Tensor]:
    """A writer as ``[d, in]`` float64 matrices (one per expert) or ``[d]`` biases (one per expert)."""
    t = w.tensor.detach().double().cpu()
    if t.dim() == 1:
        return [t]
    if "bias" in w.attr.lower():  # fused [E, d] bias
        return list(t)
    if t.dim() == 2:
        return [t if w.axis == 0 else t.T]
    return [m if w.axis == 1 else m.T for m in t]


def _expected(w: torch.Tensor, v: torch.Tensor, a: float, norm: str) -> torch.Tensor:
    """What the docstring promises for one matrix ``[d, in]`` with unit ``v`` at strength ``a``."""
    pw = w - a * torch.outer(v, v @ w)
    if norm == "output":
        return pw * (w.norm(dim=1) / pw.norm(dim=1))[:, None]
    if norm == "input":
        return pw * (w.norm(dim=0) / pw.norm(dim=0))[None]
    return pw


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return bool(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) < tol)


@pytest.mark.parametrize(
    "family,norm",
    [("llama", n) for n in NORMS] + [("mixtral", "output"), ("gpt_oss", "output"), ("qwen2_moe", "input")],
)
def test_weights_keep_channel_norms(family, norm):
    """Every writer (every expert of a fused parameter, shared experts too) becomes ``P W``, ``diag(s) P W``
    or ``P W diag(c)`` with its own strength; output/input channel norms equal the originals (1e-5)."""
    model, _ = _model(family)
    v = _vectors(1)[0].double()
    v = v / v.norm()
    edited = _weighted(norm).apply_to_weights(copy.deepcopy(model))
    ad, ad0 = get_adapter(edited), get_adapter(model)
    checked = 0
    for layer in range(ad.n_layers):
        for w, w0 in zip(ad.writers[layer], ad0.writers[layer]):
            assert w.name == w0.name
            a = (ATTN if w0.module is ad0.attn_out[layer] else MLP)[layer]
            if a == 0:
                assert torch.equal(w.tensor, w0.tensor)
                continue
            if "bias" in w.attr.lower():
                continue  # checked below for gpt_oss
            for m, m0 in zip(_mats(w), _mats(w0)):
                assert _close(m, _expected(m0, v, a, norm), 1e-5), w.name
                if norm == "output":
                    assert _close(m.norm(dim=1), m0.norm(dim=1), 1e-5)
                if norm == "input":
                    assert _close(m.norm(dim=0), m0.norm(dim=0), 1e-5)
                checked += 1
    # 3 attention outputs (layer 3's strength is 0) and 4 layers of MLP: 1, 4 experts, or 4 + a shared one
    assert checked == {"llama": 7, "mixtral": 19, "gpt_oss": 19, "qwen2_moe": 23}[family]
    e, e0 = ad.embed.weight.double().cpu(), ad0.embed.weight.double().cpu()
    assert _close(e, e0 - 0.7 * torch.outer(e0 @ v, v), 1e-5)


def test_fused_bias_takes_its_experts_output_scales():
    """GPT-OSS: ``b' = s ⊙ P b`` per expert (``[E, d]`` bias, ``[E, ff, d]`` weight) and for the attention
    output's bias with its weight's scales."""
    model, _ = _model("gpt_oss")
    v = _vectors(1)[0].double()
    v = v / v.norm()
    edited = _weighted("output").apply_to_weights(copy.deepcopy(model))
    ad, ad0 = get_adapter(edited), get_adapter(model)
    n = 0
    for layer in (0, 1):
        by_module: dict[int, list] = {}
        for w, w0 in zip(ad.writers[layer], ad0.writers[layer]):
            by_module.setdefault(id(w.module), []).append((w, w0))
        for pairs in by_module.values():
            (wb, wb0) = next(p for p in pairs if "bias" in p[0].attr.lower())
            (ww, ww0) = next(p for p in pairs if "bias" not in p[0].attr.lower())
            a = (ATTN if ww0.module is ad0.attn_out[layer] else MLP)[layer]
            for b, b0, m0 in zip(_mats(wb), _mats(wb0), _mats(ww0)):
                pw = _expected(m0, v, a, "none")
                s = m0.norm(dim=1) / pw.norm(dim=1)
                assert _close(b, s * (b0 - a * (v @ b0) * v), 1e-5)
                n += 1
    assert n == 2 * (1 + 4)


# ------------------------------------------------------------------------------------------------
# one edit per batch row


def _three(mixed: bool) -> list[WeightedAblation]:
    """Three different edits: norms (if ``mixed``), strengths, directions and ranks all differ."""
    return [
        _weighted("none"),
        _weighted(
            "output" if mixed else "none",
            "rank2",
            attn=[0.3, 1.4, 0.0, 1.0],
            mlp=[1.0, 0.0, 0.6, 0.9],
            embed=0.0,
        ),
        _weighted("input" if mixed else "none", "per_layer", attn=MLP, mlp=ATTN, embed=1.2),
    ]


@pytest.mark.parametrize(
    "family,mixed",
    [
        ("llama", True),
        ("phi3", True),
        ("gemma2", False),
        ("gemma2", True),
        ("qwen2_moe", False),
        ("gpt_oss", False),
    ],
)
def test_trial_rows_give_each_row_its_edit_alone(family, mixed):
    model, tok = _model(family)
    b = tokenize_prompts(tok, PROMPTS)
    edits = _three(mixed)
    alone = []
    for e in edits:
        with e.hooks(model):
            alone.append(_logits(model, b))  # [6, V]
    for k in range(3):
        for j in range(k):
            assert (alone[k] - alone[j]).abs().max() > 1e-3  # three really different edits
    groups = torch.tensor([0, 1, 2, 0, 1, 2])
    rows = TrialRows(model, edits, groups)
    with rows.attached():
        got = _logits(model, b)
    for i, g in enumerate(groups.tolist()):
        assert (got[i] - alone[g][i]).abs().max() < 1e-4
    other = torch.tensor([2, 2, 0, 1, 0, 1])
    with rows.serving(other):
        got = _logits(model, b)
    for i, g in enumerate(other.tolist()):
        assert (got[i] - alone[g][i]).abs().max() < 1e-4
    with rows.attached():  # serving restored the constructor's groups
        assert (_logits(model, b)[1] - alone[1][1]).abs().max() < 1e-4
    base = tokenize_prompts(tok, PROMPTS)
    assert torch.equal(_logits(model, base), _logits(copy.deepcopy(model), base))


def test_trial_rows_refuse_norms_on_fused_experts_and_foreign_edits():
    model, _ = _model("mixtral")
    with pytest.raises(RefdirError, match="fused experts"):
        TrialRows(model, _three(True), torch.zeros(1, dtype=torch.long))
    v = torch.randn(32)
    with pytest.raises(RefdirError, match="width 32"):
        TrialRows(model, [WeightedAblation(v, ATTN, MLP)], torch.zeros(1, dtype=torch.long))
    with pytest.raises(RefdirError, match="5 layers"):
        TrialRows(model, [WeightedAblation(_vectors(1)[0], [1.0] * 5, [1.0] * 5)], torch.zeros(1))


def test_invalid_parameters_raise():
    v = _vectors(1)[0]
    with pytest.raises(RefdirError, match="norm must be one of"):
        WeightedAblation(v, ATTN, MLP, norm="rows")
    with pytest.raises(RefdirError, match="attn has 4 layer strengths but mlp has 3"):
        WeightedAblation(v, ATTN, MLP[:3])
    with pytest.raises(RefdirError, match="3 vector strengths for 2 basis vectors"):
        WeightedAblation(_vectors(2), ATTN, MLP, vector_strengths=[1.0, 1.0, 1.0])
    with pytest.raises(RefdirError, match=r"directions must be \[d\]"):
        WeightedAblation(torch.randn(5, 1, 64), ATTN, MLP)


def test_json_round_trip_gives_identical_logits():
    model, tok = _model("llama")
    b = tokenize_prompts(tok, PROMPTS[:3])
    for e in _three(True):
        back = Edit.from_json(json.loads(json.dumps(e.to_json())))
        assert type(back) is WeightedAblation
        assert torch.equal(back.directions, e.directions)
        assert (back.attn, back.mlp, back.embed, back.vector_strengths, back.norm) == (
            e.attn,
            e.mlp,
            e.embed,
            e.vector_strengths,
            e.norm,
        )
        with e.hooks(model):
            want = _logits(model, b)
        with back.hooks(model):
            assert torch.equal(_logits(model, b), want)
