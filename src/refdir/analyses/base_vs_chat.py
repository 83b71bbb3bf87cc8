"""Base vs chat (paper App. J): is the refusal direction already present in the base model?

The chat model's r̂ is compared with the last-position residual stream of the chat model and of its base
model, at every layer, on a "\\n" appended to each instruction: a position both models see without any
chat-template tokens after the instruction. The per-layer cosine is the suffix analysis' reading
(:func:`~refdir.analyses.suffix_analysis.cosine_per_layer`, Fig. 5), run on both models.
"""

from __future__ import annotations

import torch

from refdir.analyses.suffix_analysis import cosine_per_layer
from refdir.core.adapter import get_adapter
from refdir.core.errors import RefdirError
from refdir.core.templates import Batch, PromptFormat, format_prompt
from refdir.core.types import Model, Tokenizer


@torch.no_grad()
def base_vs_chat_cosines(
    chat: Model,
    chat_tok: Tokenizer,
    base: Model,
    base_tok: Tokenizer,
    instructions: list[str],
    direction: torch.Tensor,
    fmt: PromptFormat = PromptFormat(),
) -> dict[str, torch.Tensor]:
    """App. J: cosine with the chat model's r̂ of activations at a "\\n" appended to each instruction.

    The chat model sees only the pre-instruction part of its template (plus the instruction and "\\n");
    the base model sees the instruction and "\\n" alone. Returns ``chat`` and ``base`` ``[N, L]``.
    """
    marker = "\u0000REFDIR\u0000"
    text = format_prompt(chat_tok, marker, fmt)
    prefix = text[: text.index(marker)]

    def run(model: Model, tok: Tokenizer, texts: list[str]) -> torch.Tensor:
        enc = tok(texts, add_special_tokens=True, padding=True, return_tensors="pt")
        return cosine_per_layer(model, Batch(enc["input_ids"], enc["attention_mask"], 0), direction)

    for t in (chat_tok, base_tok):
        t.padding_side = "left"
        if t.pad_token is None:
            t.pad_token = t.eos_token
    chat_cos = run(chat, chat_tok, [prefix + s + "\n" for s in instructions])  # [N, L]
    if get_adapter(base).d_model != direction.numel():
        raise RefdirError(
            f"base model d_model {get_adapter(base).d_model} differs from the direction's "
            f"{direction.numel()}: compare-base needs a base/chat pair of the same "
            "architecture"
        )
    base_cos = run(base, base_tok, [s + "\n" for s in instructions])  # [N, L]
    return {"chat": chat_cos, "base": base_cos}


def compare_base(
    chat: Model,
    chat_tok: Tokenizer,
    base: Model,
    base_tok: Tokenizer,
    harmful: list[str],
    harmless: list[str],
    direction: torch.Tensor,
) -> dict[str, dict[str, dict[str, list[float]]]]:
    """App. J: per-layer cosine with r̂ of the chat and the base model's activations, mean and sd over
    prompts, for harmful and harmless instructions.

    ``{"harmful" | "harmless": {"chat" | "base": {"mean": [L], "sd": [L]}}}``."""
    res: dict[str, dict[str, dict[str, list[float]]]] = {}
    for name, ins in (("harmful", harmful), ("harmless", harmless)):
        cos = base_vs_chat_cosines(chat, chat_tok, base, base_tok, ins, direction)
        res[name] = {
            k: {"mean": v.mean(0).tolist(), "sd": v.std(0, unbiased=False).tolist()} for k, v in cos.items()
        }
    return res
