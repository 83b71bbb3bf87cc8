import pytest
import torch
from tiny import FAMILIES, make_tokenizer
from torch import nn

from refdir.core.adapter import build_adapter, get_adapter
from refdir.core.errors import RefdirError
from refdir.core.templates import PromptFormat, format_prompt, post_instruction_count, post_instruction_tokens

SANDWICH = {"gemma2", "gemma3", "olmo2"}


def test_at_least_eight_families():
    assert len(FAMILIES) >= 8


def test_adapter_finds_every_part(tiny, family):
    model, _ = tiny
    ad = get_adapter(model)
    assert ad.n_layers == 4 and ad.d_model == 64
    assert len(ad.attn_out) == len(ad.writers) == 4
    assert ad.linear_writes == (family not in SANDWICH)
    # the writes really are what changes the residual stream: under ablation the component along r̂ of
    # every block input and of the final residual (last block output = input of the final norm) vanishes
    from refdir.method.interventions import directional_ablation

    r = torch.randn(64)
    unit = r / r.norm()
    seen = []
    with directional_ablation(model, r):  # capture hooks registered after (so run after) the ablation's
        hooks = [
            layer.register_forward_pre_hook(
                lambda m, a, k: seen.append(a[0] if a else k["hidden_states"]), with_kwargs=True
            )
            for layer in ad.layers
        ]
        hooks.append(
            ad.layers[-1].register_forward_hook(
                lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o)
            )
        )
        model(input_ids=torch.arange(3, 12)[None])
    for h in hooks:
        h.remove()
    assert len(seen) == ad.n_layers + 1
    for x in seen:
        rel = (x @ unit).abs() / x.norm(dim=-1)
        assert rel.max() < 1e-5


def test_unknown_architecture_is_a_clear_error():
    class Weird(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"hidden_size": 8, "num_hidden_layers": 2})()
            self.blocks = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])

    with pytest.raises(RefdirError, match="unsupported architecture"):
        build_adapter(Weird())


@pytest.mark.parametrize(
    "template,expected",
    [
        ("chatml", ["<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"]),
        ("llama3", ["<|eot_id|>", "<|start_header_id|>", "assistant", "<|end_header_id|>", "\n\n"]),
        ("gemma", ["<end_of_turn>", "\n", "<start_of_turn>", "model", "\n"]),
        ("phi3", ["<|end|>", "\n", "<|assistant|>", "\n"]),
        ("llama2", [" [/INST]"]),
    ],
)
def test_post_instruction_tokens_per_template(template, expected):
    tok = make_tokenizer(template)
    got = post_instruction_tokens(tok, PromptFormat())
    assert "".join(got) == "".join(expected)
    assert "color" not in "".join(got)


@pytest.mark.parametrize(
    "instruction", ["Name a color", "Ends with a space ", "Ends in digits 42", "Quote'", "Ends with ]", "x"]
)
def test_post_instruction_boundary_never_includes_instruction_text(instruction):
    tok = make_tokenizer("llama2")
    text = format_prompt(tok, instruction)
    n = post_instruction_count(tok, text, instruction.strip())
    ids = tok(text, add_special_tokens=False)["input_ids"]
    post = tok.decode(ids[len(ids) - n :])
    assert post.strip() == "[/INST]"


def test_missing_chat_template_is_a_clear_error():
    tok = make_tokenizer("chatml")
    tok.chat_template = None
    with pytest.raises(RefdirError, match="no chat template"):
        format_prompt(tok, "hi")


def test_template_without_system_role_merges_the_system_prompt():
    tok = make_tokenizer("gemma")
    text = format_prompt(tok, "Name a color.", PromptFormat(system="Be brief."))
    assert "Be brief." in text and "Name a color." in text


def test_family_templates_give_post_positions(tiny, family):
    _, tok = tiny
    assert len(post_instruction_tokens(tok)) >= 1


@pytest.mark.parametrize(
    "family,expected",
    [
        (
            "qwen2_moe",
            {"mlp.experts.down_proj", "mlp.shared_expert.down_proj.weight", "self_attn.o_proj.weight"},
        ),
        ("gpt_oss", {"mlp.experts.down_proj", "mlp.experts.down_proj_bias", "self_attn.o_proj.bias"}),
        ("deepseek_v3", {"mlp.experts.down_proj", "mlp.shared_experts.down_proj.weight"}),
        ("granitemoe", {"block_sparse_moe.experts.down_proj"}),
    ],
)
def test_moe_writers_cover_routed_and_shared_experts(family, expected):
    from tiny import tiny_model

    ad = get_adapter(tiny_model(family)[0])
    names = {w.name.split(".", 3)[-1] for w in ad.writers[1]}  # layer 1 (DeepSeek's layer 0 is dense)
    assert expected <= names
    assert ad.linear_writes and ad.is_moe
    axes = {w.name.split(".", 3)[-1]: w.axis for w in ad.writers[1]}
    assert axes[
        "mlp.experts.down_proj" if family != "granitemoe" else "block_sparse_moe.experts.down_proj"
    ] == (2 if family == "gpt_oss" else 1)  # GPT-OSS stores [E, ff, d], the others [E, d, ff]


def test_the_numeric_check_catches_a_missing_writer():
    from tiny import tiny_model

    from refdir.core.adapter import _edit_error

    model, _ = tiny_model("qwen2_moe")
    ad = get_adapter(model)
    full = _edit_error(model, ad.layers[1], (ad.attn_write[1], ad.mlp_write[1]), ad.writers[1], ad.d_model)
    partial = [w for w in ad.writers[1] if "shared_expert" not in w.name]  # forget the shared expert
    missing = _edit_error(model, ad.layers[1], (ad.attn_write[1], ad.mlp_write[1]), partial, ad.d_model)
    assert full < 1e-5 and missing > 1e-2
