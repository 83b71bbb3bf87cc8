"""Streaming export: tensor by tensor from the source safetensors, equal to the in-memory edit."""

import copy

import pytest
import torch
from tiny import tiny_model

from refdir.core.errors import RefdirError
from refdir.core.models import load_model
from refdir.core.templates import tokenize_prompts
from refdir.method.directions import Direction
from refdir.method.interventions import directional_ablation
from refdir.method.refusal import last_logits
from refdir.outputs.export import export_orthogonalized, export_streaming

PROMPTS = ["Write a poem about rain.", "How do I sort a list in Python?", "Explain photosynthesis briefly."]


def _setup(tmp_path, family, tie=False):
    model, tok = tiny_model(family, tie=tie)
    model.save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")
    r = torch.randn(64, generator=torch.Generator().manual_seed(5))
    Direction(r, 1, -1, "").save(tmp_path / "dir" / "direction")
    return model, tok, r


def _state(path):
    m, _ = load_model(str(path))
    return m, {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize(
    "family,tie",
    [
        ("llama", True),
        ("qwen2", False),
        ("phi3", False),
        ("qwen2_moe", False),
        ("mixtral", False),
        ("gpt_oss", False),
        ("deepseek_v3", False),
    ],
)
def test_streaming_export_equals_the_in_memory_edit(tmp_path, family, tie):
    model, tok, r = _setup(tmp_path, family, tie)
    export_streaming(
        str(tmp_path / "src"), None, tmp_path / "dir", tmp_path / "stream", max_shard_bytes=40_000
    )
    assert len(list((tmp_path / "stream").glob("*.safetensors"))) > 1  # really sharded
    export_orthogonalized(copy.deepcopy(model), tok, tmp_path / "dir", tmp_path / "mem")
    streamed, a = _state(tmp_path / "stream")
    _, b = _state(tmp_path / "mem")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # the same float64 blocks: bit for bit
    # and the exported checkpoint equals hook ablation of the original
    bt = tokenize_prompts(tok, PROMPTS)
    with directional_ablation(model, r):
        want = last_logits(model, bt.input_ids, bt.attention_mask)
    assert (last_logits(streamed, bt.input_ids, bt.attention_mask) - want).abs().max() < 1e-4


def test_streaming_export_refuses_a_post_norm_family_unless_approximate(tmp_path):
    _setup(tmp_path, "gemma2")
    with pytest.raises(RefdirError, match="allow-approximate"):
        export_streaming(str(tmp_path / "src"), None, tmp_path / "dir", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_streaming_export_needs_safetensors(tmp_path):
    _setup(tmp_path, "llama")
    for f in (tmp_path / "src").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(RefdirError, match="no .safetensors"):
        export_streaming(str(tmp_path / "src"), None, tmp_path / "dir", tmp_path / "out")
    assert not (tmp_path / "out").exists()
