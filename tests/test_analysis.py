import pytest
import torch
from tiny import tiny_model

from refdir.analyses.base_vs_chat import base_vs_chat_cosines
from refdir.analyses.suffix_analysis import (
    attention_mass,
    cosine_per_layer,
    head_attributions,
    random_suffixes,
    tokenize_with_suffix,
    top_heads,
)

INS = ["Write a poem about rain.", "Explain photosynthesis briefly.", "How do I sort a list?"]


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "granite"])
def test_head_attributions_sum_to_the_attention_total(family):
    model, tok = tiny_model(family)
    b = tokenize_with_suffix(tok, INS, random_suffixes(tok, 3, 5, seed=0))
    r = torch.randn(64)
    a = head_attributions(model, b, r)
    assert a["heads"].shape == (3, 4, 4)
    assert (a["heads"].sum(-1) + a["bias"] - a["total"]).abs().max() < 1e-4
    assert len(top_heads(a["heads"], 3)) == 3


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_attention_masses_sum_to_one(family):
    model, tok = tiny_model(family)
    b = tokenize_with_suffix(tok, INS, random_suffixes(tok, 3, 5, seed=1))
    assert b.instr_mask.any(1).all() and b.suffix_mask.any(1).all()
    assert not (b.instr_mask & b.suffix_mask).any()
    m = attention_mass(model, b, [(0, 0), (2, 3)])
    total = m["instruction"] + m["suffix"] + m["other"]
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5)
    assert (m["suffix"] > 0).all()


def test_cosine_curves_equal_direct_computation():
    model, tok = tiny_model("llama")
    b = tokenize_with_suffix(tok, INS, None)
    r = torch.randn(64)
    cos = cosine_per_layer(model, b, r)
    hs = model(
        input_ids=b.input_ids,
        attention_mask=b.attention_mask,
        position_ids=(b.attention_mask.cumsum(-1) - 1).clamp(min=0),
        output_hidden_states=True,
    ).hidden_states
    for layer in range(4):
        direct = torch.nn.functional.cosine_similarity(hs[layer][:, -1], r[None], dim=-1)
        assert torch.allclose(cos[:, layer], direct, atol=1e-5)


def test_base_vs_chat_on_tiny_models():
    chat, tok = tiny_model("qwen2", seed=0)
    base, btok = tiny_model("qwen2", seed=1)
    out = base_vs_chat_cosines(chat, tok, base, btok, INS, torch.randn(64))
    assert out["chat"].shape == out["base"].shape == (3, 4)
    assert (out["chat"].abs() <= 1).all()
