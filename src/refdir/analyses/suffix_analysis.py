"""How adversarial suffixes suppress the refusal direction (paper §5, Fig. 5-6).

* :func:`cosine_per_layer` — cosine between the last-position residual stream and r̂ at every layer.
* :func:`head_attributions` — direct feature attribution of every attention head's output at the last
  position onto r̂ (the attention-output projection split by head).
* :func:`attention_mass` — for chosen heads, attention from the last position onto the instruction
  tokens vs the suffix tokens vs the rest.

Base vs chat (App. J) lives in :mod:`refdir.analyses.base_vs_chat`; its names still import from here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from refdir.core.adapter import get_adapter, hidden_arg
from refdir.core.errors import RefdirError
from refdir.core.templates import Batch, PromptFormat, add_special, format_prompt
from refdir.core.types import Model, Tokenizer
from refdir.method.interventions import hooks
from refdir.method.refusal import decode_text, position_ids

if TYPE_CHECKING:  # the re-export below, seen by type checkers (at run time: __getattr__)
    from refdir.analyses.base_vs_chat import base_vs_chat_cosines as base_vs_chat_cosines
    from refdir.analyses.base_vs_chat import compare_base as compare_base

# Moved to base_vs_chat.py, which imports this module: resolved on first use so that neither module
# imports the other at load time (no import cycle).
MOVED_TO_BASE_VS_CHAT = ("base_vs_chat_cosines", "compare_base")


def __getattr__(name: str) -> Any:
    """The base-vs-chat names, for importers that still take them from here (PEP 562)."""
    if name in MOVED_TO_BASE_VS_CHAT:
        from refdir.analyses import base_vs_chat

        return getattr(base_vs_chat, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class SuffixBatch:
    """Chat-formatted prompts with an optional suffix appended to the instruction, left-padded.

    ``instr_mask`` / ``suffix_mask`` ``[B, T]`` mark the tokens of the instruction and of the suffix.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    instr_mask: torch.Tensor
    suffix_mask: torch.Tensor


def tokenize_with_suffix(
    tokenizer: Tokenizer,
    instructions: list[str],
    suffixes: list[str] | None,
    fmt: PromptFormat = PromptFormat(),
) -> SuffixBatch:
    """Tokenize ``instruction + " " + suffix`` in the chat template and locate both regions by offsets."""
    suffixes = suffixes or [""] * len(instructions)
    rows: list[list[int]] = []  # token ids of each prompt, unpadded
    imasks: list[list[bool]] = []  # per token: inside the instruction
    smasks: list[list[bool]] = []  # per token: inside the suffix
    for ins, suf in zip(instructions, suffixes):
        user = f"{ins} {suf}" if suf else ins
        text = format_prompt(tokenizer, user, fmt)
        start = text.rfind(user)
        i_end, s_start = start + len(ins), start + len(ins) + (1 if suf else 0)
        enc = tokenizer(text, add_special_tokens=add_special(tokenizer, text), return_offsets_mapping=True)
        ids, offs = enc["input_ids"], enc["offset_mapping"]
        imasks.append([a < i_end and b > start for a, b in offs])
        smasks.append(
            [bool(suf) and a < s_start + len(suf) and b > s_start and not (a < i_end) for a, b in offs]
        )
        rows.append(ids)
    T = max(map(len, rows))
    pad = tokenizer.pad_token_id or 0

    def left(x: list[list[Any]], v: object) -> list[list[Any]]:
        return [[v] * (T - len(r)) + list(r) for r in x]

    return SuffixBatch(
        torch.tensor(left(rows, pad)),
        torch.tensor(left([[1] * len(r) for r in rows], 0)),
        torch.tensor(left(imasks, False)),
        torch.tensor(left(smasks, False)),
    )


@torch.no_grad()
def _forward(model: Model, batch) -> None:
    """One pass over the batch for its hooks' sake: no cache, only the last position unembedded."""
    model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=position_ids(batch.attention_mask),
        use_cache=False,
        logits_to_keep=1,
    )


def cosine_per_layer(model: Model, batch: Batch | SuffixBatch, direction: torch.Tensor) -> torch.Tensor:
    """Cosine of the last-position resid_pre with r̂ at every layer ``[B, L]`` (Fig. 5)."""
    ad = get_adapter(model)
    unit = (direction / direction.norm()).float()
    out = torch.zeros(batch.input_ids.shape[0], ad.n_layers)

    def make(layer: int) -> Callable[[torch.nn.Module, tuple[Any, ...], dict[str, Any]], None]:
        def pre(mod: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = hidden_arg(args, kwargs)[:, -1].float()  # [B, d]
            out[:, layer] = torch.nn.functional.cosine_similarity(x, unit[None].to(x.device), dim=-1).cpu()

        return pre

    with hooks(
        [layer.register_forward_pre_hook(make(i), with_kwargs=True) for i, layer in enumerate(ad.layers)]
    ):
        _forward(model, batch)
    return out


@torch.no_grad()
def head_attributions(
    model: Model, batch: Batch | SuffixBatch, direction: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Direct feature attribution onto r̂ of each head's output at the last position.

    Returns ``heads`` ``[B, L, H]``, ``bias`` ``[L]`` (the projection bias' share) and ``total`` ``[B, L]``
    (the attention output projection's whole contribution), with ``heads.sum(-1) + bias == total``.
    For sandwich-norm models the attribution is of the projection output, before the post-norm.
    """
    ad = get_adapter(model)
    if not all(isinstance(m, torch.nn.Linear) for m in ad.attn_out):
        raise RefdirError("head attribution needs nn.Linear attention-output projections")
    unit = (direction / direction.norm()).float()
    B, L, H, dh = batch.input_ids.shape[0], ad.n_layers, ad.n_heads, ad.head_dim
    heads, total = torch.zeros(B, L, H), torch.zeros(B, L)
    bias = torch.zeros(L)

    def make(layer: int) -> tuple[Callable[..., None], Callable[..., None]]:
        proj = ad.attn_out[layer]

        def pre(mod: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            z = args[0][:, -1].float()  # [B, H*dh]: concatenated head outputs at the last position
            w = proj.weight.float()  # [d, H*dh]
            per = (z.view(B, H, dh) * (unit.to(w.device) @ w).view(1, H, dh)).sum(-1)  # [B, H]
            heads[:, layer] = per.cpu()
            b = float(proj.bias.float() @ unit.to(w.device)) if proj.bias is not None else 0.0
            bias[layer] = b

        def post(mod: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            total[:, layer] = (out[:, -1].float() @ unit.to(out.device)).cpu()

        return pre, post

    handles: list[torch.utils.hooks.RemovableHandle] = []
    for i in range(L):
        pre, post = make(i)
        handles += [ad.attn_out[i].register_forward_pre_hook(pre), ad.attn_out[i].register_forward_hook(post)]
    with hooks(handles):
        _forward(model, batch)
    return {"heads": heads, "bias": bias, "total": total}


@contextlib.contextmanager
def eager_attention(model: Model) -> Iterator[None]:
    """Temporarily compute attention explicitly so the probabilities can be read."""
    old = getattr(model.config, "_attn_implementation", None)
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if old and old != "eager":
            model.set_attn_implementation(old)


@torch.no_grad()
def attention_mass(model: Model, batch: SuffixBatch, heads: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """Attention from the last position onto instruction / suffix / other tokens, per head ``[B, K]`` each."""
    ad = get_adapter(model)
    probs: dict[int, torch.Tensor] = {}

    def make(layer: int) -> Callable[[torch.nn.Module, tuple[Any, ...], Any], None]:
        def post(mod: torch.nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if isinstance(out, tuple) and len(out) > 1 and out[1] is not None:
                probs[layer] = out[1][:, :, -1, :].float().cpu()  # [B, H, T]

        return post

    layers = sorted({l for l, _ in heads})
    with eager_attention(model), hooks([ad.attn[l].register_forward_hook(make(l)) for l in layers]):
        _forward(model, batch)
    if set(probs) != set(layers):
        raise RefdirError("this model's attention modules do not return attention probabilities")
    inst, suf = batch.instr_mask.float(), batch.suffix_mask.float()
    out: dict[str, list[torch.Tensor]] = {"instruction": [], "suffix": [], "other": []}  # [B] per head
    for l, h in heads:
        p = probs[l][:, h]  # [B, T]
        out["instruction"].append((p * inst).sum(-1))
        out["suffix"].append((p * suf).sum(-1))
        out["other"].append((p * (1 - inst - suf)).sum(-1))
    return {k: torch.stack(v, 1) for k, v in out.items()}


def top_heads(attr: torch.Tensor, k: int = 8) -> list[tuple[int, int]]:
    """The k heads with the largest mean attribution ``attr`` ``[B, L, H]`` onto r̂."""
    mean = attr.mean(0)
    idx = torch.topk(mean.flatten(), min(k, mean.numel())).indices
    return [(int(i) // mean.shape[1], int(i) % mean.shape[1]) for i in idx]


def random_suffixes(tokenizer: Tokenizer, n: int, n_tokens: int, seed: int) -> list[str]:
    """Random token suffixes of the same length, resampled per prompt (the control)."""
    g = torch.Generator().manual_seed(seed)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    out: list[str] = []
    for _ in range(n):
        ids = [vocab[int(j)] for j in torch.randint(len(vocab), (n_tokens,), generator=g)]
        out.append(decode_text(tokenizer, ids, skip_special_tokens=False))
    return out


def _mean_sd(x: torch.Tensor) -> dict[str, list[float]]:
    return {"mean": x.mean(0).tolist(), "sd": x.std(0, unbiased=False).tolist()}


def suffix_analysis(
    model: Model,
    tok: Tokenizer,
    harmful: list[str],
    harmless: list[str],
    direction: torch.Tensor,
    adv_suffix: str,
    n_suffix_tokens: int,
    top_k: int = 8,
    seed: int = 0,
    fmt: PromptFormat = PromptFormat(),
) -> dict[str, Any]:
    """Fig. 5 and 6 on refusal-eliciting harmful prompts: plain, + random suffix, + adversarial suffix."""
    rand = random_suffixes(tok, len(harmful), n_suffix_tokens, seed)
    batches = {
        "harmful": tokenize_with_suffix(tok, harmful, None, fmt),
        "harmful+random": tokenize_with_suffix(tok, harmful, rand, fmt),
        "harmful+adversarial": tokenize_with_suffix(tok, harmful, [adv_suffix] * len(harmful), fmt),
        "harmless": tokenize_with_suffix(tok, harmless, None, fmt),
    }
    cos = {k: _mean_sd(cosine_per_layer(model, b, direction)) for k, b in batches.items()}
    attr = {
        k: head_attributions(model, batches[k], direction)["heads"]
        for k in ("harmful", "harmful+random", "harmful+adversarial")
    }
    heads = top_heads(attr["harmful"], top_k)
    head_attr = {k: [float(v[:, l, h].mean()) for l, h in heads] for k, v in attr.items()}
    mass = {
        k: {r: v.mean(0).tolist() for r, v in attention_mass(model, batches[k], heads).items()}
        for k in ("harmful+random", "harmful+adversarial")
    }
    return {
        "n_harmful": len(harmful),
        "n_harmless": len(harmless),
        "adversarial_suffix": adv_suffix,
        "random_suffix_tokens": n_suffix_tokens,
        "cosine_per_layer": cos,
        "top_heads": heads,
        "head_attribution": head_attr,
        "attention_mass": mass,
    }
