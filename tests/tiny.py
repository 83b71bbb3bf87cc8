"""Tiny random models of every supported family, built from transformers configs (no download)."""

from __future__ import annotations

import functools
import os

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from refdir.method.data import load_builtin

SPECIALS = [
    "<pad>",
    "<s>",
    "</s>",
    "<|im_start|>",
    "<|im_end|>",
    "[INST]",
    "[/INST]",
    "<start_of_turn>",
    "<end_of_turn>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|system|>",
]

# Simplified copies of each family's chat template: same turn markers, same text/template boundary.
TEMPLATES = {
    "chatml": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "qwen_default_system": "{% if messages[0]['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant."
    "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "llama3": "<|begin_of_text|>{% for m in messages %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
    "llama2": "{% for m in messages %}{% if m['role'] == 'user' %}<s>[INST] {{ m['content'] | trim }} [/INST]"
    "{% elif m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}{% endfor %}",
    "gemma": "<s>{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}"
    "{% endif %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
    "phi3": "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
}


@functools.cache
def _tokenizer_json() -> str:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [p.instruction for p in load_builtin("harmful") + load_builtin("harmless")]
    corpus += [
        "I'm sorry, but I can't help with that.",
        "Sure, here is",
        "assistant",
        "user",
        "system",
        "model",
    ]
    tok.train_from_iterator(corpus, trainer)
    return tok.to_str()


def make_tokenizer(template: str = "chatml"):
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    tok.chat_template = TEMPLATES[template]
    tok.padding_side = "left"
    return tok


COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    vocab_size=640,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

FAMILIES = {
    "llama": (transformers.LlamaConfig, {}, "llama3"),
    "qwen2": (transformers.Qwen2Config, {}, "qwen_default_system"),
    "qwen3": (transformers.Qwen3Config, {"head_dim": 16}, "chatml"),
    "gemma": (transformers.GemmaConfig, {"head_dim": 16}, "gemma"),
    "gemma2": (transformers.Gemma2Config, {"head_dim": 16}, "gemma"),
    "gemma3": (transformers.Gemma3TextConfig, {"head_dim": 16, "sliding_window": 8}, "gemma"),
    "mistral": (transformers.MistralConfig, {}, "llama2"),
    "phi3": (transformers.Phi3Config, {}, "phi3"),
    "olmo2": (transformers.Olmo2Config, {}, "chatml"),
    "granite": (
        transformers.GraniteConfig,
        {
            "residual_multiplier": 0.5,
            "embedding_multiplier": 2.0,
            "attention_multiplier": 0.25,
            "logits_scaling": 2.0,
        },
        "chatml",
    ),
}

# Mixture-of-experts families: fused expert parameters in both layouts ([E, d, ff] and GPT-OSS's [E, ff, d]
# with biases), shared experts (Qwen2-MoE, DeepSeek-V3), dense first layers (DeepSeek-V3), MLA attention.
MOE = dict(num_experts_per_tok=2)
MOE_FAMILIES = {
    "mixtral": (transformers.MixtralConfig, {**MOE, "num_local_experts": 4}, "chatml"),
    "qwen2_moe": (
        transformers.Qwen2MoeConfig,
        {**MOE, "num_experts": 4, "moe_intermediate_size": 48, "shared_expert_intermediate_size": 96},
        "qwen_default_system",
    ),
    "qwen3_moe": (
        transformers.Qwen3MoeConfig,
        {**MOE, "num_experts": 4, "moe_intermediate_size": 48, "head_dim": 16},
        "chatml",
    ),
    "olmoe": (transformers.OlmoeConfig, {**MOE, "num_experts": 4}, "chatml"),
    "gpt_oss": (
        transformers.GptOssConfig,
        {
            **MOE,
            "num_local_experts": 4,
            "head_dim": 16,
            "sliding_window": 8,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        },
        "chatml",
    ),
    "deepseek_v3": (
        transformers.DeepseekV3Config,
        {
            **MOE,
            "n_routed_experts": 4,
            "num_key_value_heads": 4,
            "moe_intermediate_size": 48,
            "first_k_dense_replace": 1,
            "n_group": 1,
            "topk_group": 1,
            "q_lora_rank": 32,
            "kv_lora_rank": 16,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 16,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        },
        "chatml",
    ),
    "granitemoe": (transformers.GraniteMoeConfig, {**MOE, "num_local_experts": 4}, "chatml"),
}
FAMILIES.update(MOE_FAMILIES)


def tiny_model(family: str, seed: int = 0, tie: bool = False):
    cls, extra, template = FAMILIES[family]
    cfg = cls(**{**COMMON, **extra, "tie_word_embeddings": tie})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # random init is too small to give interesting activations; widen it a bit
    # (and randomize norm weights: with unit norms, ablating before a post-sublayer norm would look right)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif "norm" in n:
                p.uniform_(0.5, 1.5)
    model.eval().requires_grad_(False)
    model.to(os.environ.get("REFDIR_TEST_DEVICE", "cpu"))  # benchmarks/gpu_check.sh runs the tests on CUDA
    model.refdir_spec = f"tiny-{family}"
    tok = make_tokenizer(template)
    return model, tok
