"""A search trial's edit exported two ways: streamed tensor by tensor from the checkpoint, and written into a
loaded model: the same tensors (dense, fused and per-expert MoE, biases with output norms kept), the
logits of the edit's hook form, and refdir.json naming the trial."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_model

from refdir.core.adapter import get_adapter
from refdir.method.weighted import WeightedAblation
from refdir.outputs.edit_export import export_edit, export_edit_streaming


def _edit(model, norm: str) -> WeightedAblation:
    ad = get_adapter(model)
    n = ad.n_layers
    v = torch.randn(2, ad.d_model, generator=torch.Generator().manual_seed(5))
    directions = v if norm == "input" else v[0]  # rank 2 for one of them
    return WeightedAblation(
        directions,
        [0.5 + 0.3 * i for i in range(n)],
        [1.2 - 0.2 * i for i in range(n)],
        embed=0.7,
        vector_strengths=[1.0, 0.4] if norm == "input" else None,
        norm=norm,
    )


def _tensors(folder) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("family", ["qwen2", "gpt_oss", "qwen2_moe"])
@pytest.mark.parametrize("norm", ["none", "output", "input"])
def test_streamed_trial_equals_in_memory_edit(family, norm, tmp_path):
    model, tok = tiny_model(family)
    src = tmp_path / "src"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    edit = _edit(model, norm)
    meta = {"run": "r", "trial": 3}
    streamed = export_edit_streaming(str(src), edit, tmp_path / "s", meta)
    in_memory = export_edit(copy.deepcopy(model), tok, edit, tmp_path / "m", meta)
    a, b = _tensors(streamed), _tensors(in_memory)
    edited = [k for k in b if k in a and not torch.equal(a[k], _tensors(src).get(k, a[k]))]
    assert len(edited) > 2  # the edit changed tensors
    for k in set(a) & set(b):
        assert (a[k].float() - b[k].float()).abs().max() < 1e-6, k
    info = json.loads((streamed / "refdir.json").read_text())
    assert info["trial"] == 3 and info["edit_kind"] == "weighted_ablation"
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(streamed, dtype=torch.float32)
    ids = torch.randint(0, 600, (2, 9), generator=torch.Generator().manual_seed(0))
    if edit.exact_on(model):  # the checkpoint's logits are the hook form's
        with edit.hooks(model):
            hooked = model(input_ids=ids).logits
        assert (loaded(input_ids=ids).logits - hooked).abs().max() < 1e-4
