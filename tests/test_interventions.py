import copy

import pytest
import torch
from tiny import tiny_model

from refdir.core.adapter import get_adapter
from refdir.core.errors import RefdirError
from refdir.core.templates import tokenize_prompts
from refdir.method.activations import mean_activations
from refdir.method.interventions import activation_addition, directional_ablation, orthogonalize_weights
from refdir.method.refusal import last_logits

PROMPTS = [
    "Write a poem about rain.",
    "How do I sort a list in Python?",
    "Explain photosynthesis briefly.",
    "Give me three tips for sleeping better.",
]


def _direction(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(64, generator=g)


@pytest.mark.parametrize("tie", [False, True])
def test_orthogonalization_equals_ablation(tiny, family, tie):
    model, tok = tiny_model(family, tie=tie)
    ad = get_adapter(model)
    b = tokenize_prompts(tok, PROMPTS)
    r = _direction()
    with directional_ablation(model, r):
        ablated = last_logits(model, b.input_ids, b.attention_mask)
    base = last_logits(model, b.input_ids, b.attention_mask)
    m2 = copy.deepcopy(model)
    if not ad.linear_writes:
        with pytest.raises(RefdirError, match="allow-approximate"):
            orthogonalize_weights(m2, r)
        return
    orthogonalize_weights(m2, r)
    ortho = last_logits(m2, b.input_ids, b.attention_mask)
    assert (ablated - ortho).abs().max() < 1e-4
    assert (ablated - base).abs().max() > 1e-3  # the intervention did something
    # with tied embeddings the unembedding is untied and unchanged
    assert torch.equal(m2.get_output_embeddings().weight, model.get_output_embeddings().weight)


def test_hooks_are_removed_even_on_error():
    model, tok = tiny_model("llama")
    b = tokenize_prompts(tok, PROMPTS)
    base = last_logits(model, b.input_ids, b.attention_mask)
    with pytest.raises(ValueError):
        with directional_ablation(model, _direction()), activation_addition(model, _direction(), 2):
            raise ValueError
    assert torch.equal(base, last_logits(model, b.input_ids, b.attention_mask))


def test_per_row_directions_equal_separate_runs():
    model, tok = tiny_model("qwen2")
    b = tokenize_prompts(tok, PROMPTS[:2])
    r1, r2 = _direction(1), _direction(2)
    rows = torch.stack([r1, r1, r2, r2])
    ids, mask = b.input_ids.repeat(2, 1), b.attention_mask.repeat(2, 1)
    with directional_ablation(model, rows):
        both = last_logits(model, ids, mask)
    for k, r in enumerate((r1, r2)):
        with directional_ablation(model, r):
            one = last_logits(model, b.input_ids, b.attention_mask)
        assert (both[2 * k : 2 * k + 2] - one).abs().max() < 1e-4


def test_activation_addition_shifts_resid_by_vector():
    model, tok = tiny_model("llama")
    b = tokenize_prompts(tok, PROMPTS)
    v = _direction()
    base = mean_activations(model, b)
    with activation_addition(model, v, 2, coeff=-1.5):
        shifted = mean_activations(model, b)
    assert torch.allclose(shifted[:, :2], base[:, :2], atol=1e-6)  # layers before 2 untouched
    assert torch.allclose(shifted[:, 2] - base[:, 2], (-1.5 * v).double().expand_as(base[:, 2]), atol=1e-4)


def test_bad_directions_are_rejected():
    model, _ = tiny_model("llama")
    with pytest.raises(RefdirError, match="d_model"):
        with directional_ablation(model, torch.randn(65)):
            pass
    with pytest.raises(RefdirError, match="zero norm"):
        with directional_ablation(model, torch.zeros(64)):
            pass
    with pytest.raises(RefdirError, match="out of range"):
        with activation_addition(model, torch.randn(64), 9):
            pass
