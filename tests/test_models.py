"""Loading: devices, dtypes, device maps (disk offload as the CPU stand-in for several GPUs), bitsandbytes."""

import copy
import json
import sys

import pytest
import torch
from tiny import tiny_model

from refdir.core.adapter import get_adapter
from refdir.core.errors import RefdirError
from refdir.core.models import load_model, parse_max_memory, resolve_device, resolve_dtype
from refdir.core.templates import tokenize_prompts
from refdir.method.interventions import directional_ablation, orthogonalize_weights
from refdir.method.refusal import last_logits

PROMPTS = ["Write a poem about rain.", "How do I sort a list in Python?", "Explain photosynthesis briefly."]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")


def unit_vector(seed=3, d=64):
    r = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return r / r.norm()


def _block_inputs_and_final(model, ids, mask):
    """The residual stream entering every block and leaving the last one, as the hooks leave it."""
    ad = get_adapter(model)
    seen = []
    hs = [
        layer.register_forward_pre_hook(
            lambda m, a, k: seen.append(a[0] if a else k["hidden_states"]), with_kwargs=True
        )
        for layer in ad.layers
    ]
    hs.append(
        ad.layers[-1].register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
    )
    try:
        model(input_ids=ids, attention_mask=mask)
    finally:
        for h in hs:
            h.remove()
    return seen


@no_cuda
@pytest.mark.parametrize(
    "device,msg",
    [
        ("cuda", "CUDA is not available"),
        ("cuda:3", "CUDA is not available"),
        ("tpu", "unknown device"),
        ("cpu:1", "unknown device"),
    ],
)
def test_bad_devices_are_one_line_errors(device, msg):
    with pytest.raises(RefdirError, match=msg):
        resolve_device(device)


def test_auto_dtype():
    class Cfg:
        def __init__(self, dtype, model_type="llama"):
            self.dtype, self.model_type = dtype, model_type

    assert resolve_dtype("auto", "cpu", Cfg(torch.bfloat16)) == torch.float32  # ~8x faster on this CPU
    assert resolve_dtype("auto", "cuda", Cfg(torch.bfloat16)) == torch.bfloat16
    assert resolve_dtype("auto", "cuda", Cfg(torch.float16)) == torch.float16
    # fp16 overflows
    assert resolve_dtype("auto", "cuda", Cfg(torch.float16, "gemma3_text")) == torch.bfloat16
    assert resolve_dtype("auto", "cuda", Cfg(torch.float32)) == torch.bfloat16
    assert resolve_dtype("float16", "cpu", Cfg(torch.float32)) == torch.float16
    with pytest.raises(RefdirError, match="unknown dtype"):
        resolve_dtype("int3", "cpu")


def test_max_memory_parsing():
    assert parse_max_memory("0=20GiB,1=40GiB,cpu=64GiB") == {0: "20GiB", 1: "40GiB", "cpu": "64GiB"}
    assert parse_max_memory('{"0": "10GiB"}') == {0: "10GiB"}
    with pytest.raises(RefdirError, match="DEVICE=SIZE"):
        parse_max_memory("lots")


def test_load_options_are_checked_before_weights(tiny_folder, tmp_path):
    partial = tmp_path / "map.json"
    partial.write_text(json.dumps({"model.embed_tokens": "cpu", "model.layers.0": "cpu"}))
    with pytest.raises(RefdirError, match="does not place"):
        load_model(str(tiny_folder), device_map=str(partial))
    with pytest.raises(RefdirError, match="unknown --device-map"):
        load_model(str(tiny_folder), device_map="everywhere")
    with pytest.raises(RefdirError, match="hub ids only"):
        load_model(str(tiny_folder), revision="main")
    model, _ = load_model(str(tiny_folder))
    assert model.dtype == torch.float32 and model.refdir_load["dtype"] == "float32"  # auto on the CPU


def test_missing_bitsandbytes_names_the_pip_command(tiny_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(RefdirError, match="pip install bitsandbytes"):
        load_model(str(tiny_folder), load_in_4bit=True)


def test_prompt_longer_than_the_context_is_an_input_error():
    from refdir.method.refusal import generate

    model, tok = tiny_model("qwen2")  # 256 positions
    with pytest.raises(RefdirError, match="exceeds the model's context of 256"):
        generate(model, tok, ["word " * 400], max_new_tokens=8)


def _offload_map(model, on_disk=(1, 2, 3)):
    ad = get_adapter(model)
    names = {m: n for n, m in model.named_modules()}
    dm = {n: "cpu" for n, c in model.model.named_children() for n in [f"model.{n}"] if n != "model.layers"}
    dm.update({names[layer]: "disk" if i in on_disk else "cpu" for i, layer in enumerate(ad.layers)})
    dm["lm_head"] = "cpu"
    return dm


@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_ablation_on_a_disk_offloaded_device_map(family, tmp_path):
    """accelerate dispatch with layers on disk: hooks still remove r̂ everywhere and give the same logits."""
    model, tok = tiny_model(family)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "map.json").write_text(json.dumps(_offload_map(model)))
    off, _ = load_model(
        str(tmp_path / "m"), device_map=str(tmp_path / "map.json"), offload_folder=str(tmp_path / "off")
    )
    assert any(p.device.type == "meta" for p in off.parameters())  # really offloaded
    b = tokenize_prompts(tok, PROMPTS)
    r = unit_vector()
    with directional_ablation(model, r):
        want = last_logits(model, b.input_ids, b.attention_mask)
    with directional_ablation(off, r):
        got = last_logits(off, b.input_ids, b.attention_mask)
        for x in _block_inputs_and_final(off, b.input_ids, b.attention_mask):
            assert ((x @ r).abs() / x.norm(dim=-1)).max() < 1e-5
    assert (got - want).abs().max() < 1e-4
    with pytest.raises(RefdirError, match="offloaded"):
        orthogonalize_weights(off, r)


def test_bf16_loading_path(tiny_folder):
    model, tok = load_model(str(tiny_folder), dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    b = tokenize_prompts(tok, PROMPTS)
    r = unit_vector()
    with directional_ablation(model, r):
        ablated = last_logits(model, b.input_ids, b.attention_mask)
        for x in _block_inputs_and_final(model, b.input_ids, b.attention_mask):
            assert ((x.float() @ r).abs() / x.float().norm(dim=-1)).max() < 2e-2  # bf16 rounding of P·x
    m2 = copy.deepcopy(model)
    orthogonalize_weights(m2, r)
    ortho = last_logits(m2, b.input_ids, b.attention_mask)
    base = last_logits(model, b.input_ids, b.attention_mask)
    assert (ortho - ablated).abs().max() < 0.1 * (base - ablated).abs().max()  # equal up to bf16 rounding


@pytest.mark.parametrize("bits", [8, 4])
def test_bitsandbytes_weights_take_hooks_not_edits(tiny_folder, bits):
    pytest.importorskip("bitsandbytes")
    model, tok = load_model(str(tiny_folder), **{f"load_in_{bits}bit": True})
    ad = get_adapter(model)
    assert any("quantized" in n for n in ad.notes)
    b = tokenize_prompts(tok, PROMPTS)
    r = unit_vector()
    with directional_ablation(model, r):
        for x in _block_inputs_and_final(model, b.input_ids, b.attention_mask):
            assert ((x.float() @ r).abs() / x.float().norm(dim=-1)).max() < 1e-5
    with pytest.raises(RefdirError, match="quantized"):
        orthogonalize_weights(model, r)
