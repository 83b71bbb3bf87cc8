"""Chat-formatted prompts and the post-instruction positions.

Prompts are always built by the tokenizer's own ``apply_chat_template``. The *post-instruction
positions* are the template tokens after the user's text (for Qwen: ``<|im_end|>``, ``\\n``,
``<|im_start|>``, ``assistant``, ``\\n``). We find them from character offsets in the actual
tokenized prompt, not by tokenizing the template suffix on its own: the reference code did the
latter and got Llama-2's ``[/INST]`` wrong, because the boundary token merges with the text.

Templates seen in the wild: Llama-3 and Gemma trim the user's text (an instruction with surrounding
whitespace is then found by its stripped text); Llama-3.x prints today's date (the rendered prompt is
part of every stage key, so a resumed run never mixes two dates: pin it with
``--template-kwargs '{"date_string": "26 Jul 2024"}'``); ``template_kwargs`` reach
``apply_chat_template`` (Qwen3: ``{"enable_thinking": false}``); reasoning templates whose generation
prompt opens a thinking block (``<think>\n``) simply have those tokens among the post-instruction
positions, where the direction may be found.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from refdir.core.errors import RefdirError
from refdir.core.prompt_format import PromptFormat
from refdir.core.types import Tokenizer


def _messages(instruction: str, system: str | None) -> list[dict]:
    msgs = [] if system is None else [{"role": "system", "content": system}]
    return msgs + [{"role": "user", "content": instruction}]


def _text(rendered: object) -> str:
    """``apply_chat_template(tokenize=False)`` returns the rendered text; its declared type is a union."""
    assert isinstance(rendered, str)
    return rendered


def format_prompt(tokenizer: Tokenizer, instruction: str, fmt: PromptFormat = PromptFormat()) -> str:
    """The chat-formatted text of one instruction, ending where the assistant starts to speak."""
    template = fmt.chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise RefdirError(
            "the tokenizer has no chat template; this looks like a base model: "
            "pass --chat-template FILE (a Jinja template) to use it anyway"
        )
    extra = fmt.kwargs()
    try:
        return _text(
            tokenizer.apply_chat_template(
                _messages(instruction, fmt.system),
                chat_template=template,
                tokenize=False,
                add_generation_prompt=True,
                **extra,
            )
        )
    except Exception as e:  # templates without a system role raise from Jinja
        if fmt.system is None:
            raise RefdirError(f"the chat template failed: {str(e)[:200]}") from e
        merged = f"{fmt.system}\n\n{instruction}" if fmt.system else instruction
        return _text(
            tokenizer.apply_chat_template(
                _messages(merged, None),
                chat_template=template,
                tokenize=False,
                add_generation_prompt=True,
                **extra,
            )
        )


def add_special(tokenizer: Tokenizer, text: str) -> bool:
    """Templates usually write BOS themselves; add special tokens only when they did not."""
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos and text.startswith(bos))


def post_instruction_count(tokenizer: Tokenizer, text: str, instruction: str) -> int:
    """How many tokens at the end of ``text`` come strictly after the instruction's last character.

    A token that straddles the boundary contains instruction text and is *not* post-instruction.
    """
    end = text.rfind(instruction)
    if end < 0 and instruction.strip():  # templates that trim the user's text (Llama-3, Gemma)
        instruction = instruction.strip()
        end = text.rfind(instruction)
    if end < 0:
        raise RefdirError(
            "the chat template changed the instruction text; cannot locate post-instruction tokens"
        )
    end += len(instruction)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=add_special(tokenizer, text), return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        n = 0
        for start, stop in reversed(offsets):
            if stop == start == 0 and n > 0 and len(offsets) > 1:
                continue  # special tokens added outside the text (rare at the end)
            if start < end:
                break
            n += 1
        return n
    # slow tokenizers: tokens shared by the prompt and the same prompt with different text
    ids = tokenizer(text, add_special_tokens=add_special(tokenizer, text))["input_ids"]
    alt_text = text[: end - len(instruction)] + instruction + " zq" + text[end:]
    alt = tokenizer(alt_text, add_special_tokens=add_special(tokenizer, alt_text))["input_ids"]
    n = 0
    while n < min(len(ids), len(alt)) and ids[-1 - n] == alt[-1 - n]:
        n += 1
    return n


@dataclass
class Batch:
    """Tokenized, left-padded prompts: the last ``n_post`` positions are post-instruction."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    n_post: int


def left_padded(seqs: list[list[int]], n_post: int, device, pad: int = 0) -> Batch:
    """Token lists as a left-padded :class:`Batch` (``pad`` ids masked out): rows end at the same
    column, so the last positions of every row line up."""
    t = max(map(len, seqs))
    ids = torch.tensor([[pad] * (t - len(s)) + list(s) for s in seqs], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (t - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long, device=device)
    return Batch(ids, mask, n_post)


def tokenize_prompts(
    tokenizer: Tokenizer,
    instructions: list[str],
    fmt: PromptFormat = PromptFormat(),
    device: str | torch.device = "cpu",
) -> Batch:
    """Chat-format and left-pad a list of instructions (so position -1 is the last template token)."""
    texts = [format_prompt(tokenizer, s, fmt) for s in instructions]
    n_post = min(post_instruction_count(tokenizer, t, s) for t, s in zip(texts, instructions))
    if n_post < 1:
        raise RefdirError(
            "the chat template puts no tokens after the user's text; no post-instruction positions"
        )
    add = add_special(tokenizer, texts[0])
    # left padding for this call only: the caller's tokenizer keeps its own padding side
    enc = tokenizer(texts, add_special_tokens=add, padding=True, padding_side="left", return_tensors="pt")
    return Batch(enc["input_ids"].to(device), enc["attention_mask"].to(device), n_post)


def post_instruction_tokens(tokenizer: Tokenizer, fmt: PromptFormat = PromptFormat()) -> list[str]:
    """The post-instruction tokens as strings, for reports (computed on a probe instruction)."""
    probe = "Name a color."
    text = format_prompt(tokenizer, probe, fmt)
    n = post_instruction_count(tokenizer, text, probe)
    ids = tokenizer(text, add_special_tokens=add_special(tokenizer, text))["input_ids"]
    return [str(tokenizer.decode([i])) for i in ids[len(ids) - n :]]  # one flat row: a str
