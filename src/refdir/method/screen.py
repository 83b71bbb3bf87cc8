"""The prompt screen (paper §2.1, App. A): splits, the refusal filter, refusal tokens and the induce
threshold.

Every training prompt is answered greedily for a few tokens (a row stops at its first refusal phrase); the
screen's prompt passes also record the post-instruction activations, so extraction costs nothing more.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from refdir.core.errors import RefdirError
from refdir.core.runtime import Runtime
from refdir.core.templates import format_prompt, post_instruction_tokens
from refdir.method.activations import PostActivationRecorder
from refdir.method.data import Prompt, load_prompts, load_text_pairs, pool_after, split_prompts
from refdir.method.refusal import derive_refusal_tokens, generate_batch, is_refusal, refusal_metric
from refdir.run.settings import RunConfig

HARMLESS_ROW = 1 << 20  # recorder row of the first harmless prompt (harmful prompts are rows 0, 1, ...)
SCREEN_TOKENS = 8  # "I'm sorry, but I can't" fits: enough to judge a refusal


def _load_sets(cfg: RunConfig) -> dict[str, list[Prompt]]:
    harmful, harmless = (
        load_prompts(cfg.harmful, cfg.prompt_field),
        load_prompts(cfg.harmless, cfg.prompt_field),
    )
    out = {}
    for side, pool, ev in (("harmful", harmful, cfg.eval_harmful), ("harmless", harmless, cfg.eval_harmless)):
        if ev is None:  # hold the eval set out of the training pool
            (eval_set,) = split_prompts(pool, [cfg.n_eval], cfg.seed + 1, f"{side} ({getattr(cfg, side)})")
            rest = pool_after(pool, [eval_set])
        else:
            given = load_prompts(ev, cfg.prompt_field)
            eval_set = (
                given if len(given) <= cfg.n_eval else split_prompts(given, [cfg.n_eval], cfg.seed + 1, ev)[0]
            )
            rest = pool_after(pool, [eval_set])
        (ordered,) = split_prompts(
            rest, [cfg.n_train + cfg.n_val], cfg.seed, f"{side} ({getattr(cfg, side)})"
        )
        refill = pool_after(rest, [ordered])
        out[side] = ordered + refill  # candidates for train+val in order, refill pool after them
        out[f"eval_{side}"] = eval_set
    return out


def validate_inputs(cfg: RunConfig) -> dict[str, list[Prompt]]:
    """Load every prompt source and check the sizes: all before any model is loaded."""
    sets = _load_sets(cfg)
    if cfg.ce_text:
        load_text_pairs(cfg.ce_text)  # a bad file fails here, before any model is loaded
    need = cfg.n_train + cfg.n_val
    if len(sets["harmful"]) < need or len(sets["harmless"]) < need:
        raise RefdirError(
            f"not enough prompts: need {need} train+val per side after holding out "
            f"{cfg.n_eval} for eval, have {len(sets['harmful'])} harmful and "
            f"{len(sets['harmless'])} harmless; lower the sizes or add prompts"
        )
    return sets


@dataclass
class ScreenedPrompts:
    """The prompt screen's artifact: ``data`` is what ``prompts.json`` holds (splits, refusal tokens, filter
    counts, the exact prompt format); ``train_rows`` says which rows of the screen's activation recorder are
    the training prompts (harmful prompt i is row i, harmless prompt i row ``HARMLESS_ROW + i``), so
    extraction can average what the screen already computed. Not written: the means are."""

    data: dict
    train_rows: dict[str, list[int]]


def _screen_until(
    rt: Runtime,
    prompts: list[Prompt],
    wanted,
    target: int,
    need: int,
    desc: str,
    row0: int,
    recorder: PostActivationRecorder | None,
) -> tuple[torch.Tensor, list[str]]:
    """Screen prompts until ``target`` completions satisfy ``wanted``: the rest stays unscreened.

    The first chunk is what a perfect rate would need (plus a margin); later chunks are sized from the
    rate seen so far, so the screen reads few prompts it does not use. Returns the first-token logits
    ``[n_screened, V]`` and the completions.
    """
    rows, n_new = rt.batch.gen_rows, SCREEN_TOKENS
    logits: list[torch.Tensor] = []  # [rows, V] first-token logits per batch
    comps: list[str] = []
    bar = tqdm(total=len(prompts), desc=desc, leave=False)
    i, step = 0, target + 8
    while i < len(prompts):
        chunk = [p.instruction for p in prompts[i : i + step]]
        for j in range(0, len(chunk), rows):
            rec = recorder.bucket(row0 + i + j) if recorder is not None else None
            cp, lg = generate_batch(
                rt.model,
                rt.tokenizer,
                chunk[j : j + rows],
                rt.fmt,
                n_new,
                first_logits=True,
                stop_at_refusal=True,
                on_bucket=rec,
                on_done=bar.update,
            )  # the bar counts finished rows, not batches
            assert lg is not None  # asked for with first_logits=True
            logits.append(lg)
            comps += cp
        i += len(chunk)
        hits = sum(map(wanted, comps))
        if len(comps) >= need + 8 and hits >= target:
            break
        rate = max(hits, 1) / len(comps)
        step = int((max(target - hits, 0) / rate) * 1.1) + 8
    bar.close()
    return torch.cat(logits), comps


def _refusal_tokens(rt: Runtime, cfg: RunConfig, refusals: list[str]) -> tuple[list[int], dict]:
    """The user's refusal tokens, or the first tokens of the model's own greedy refusals."""
    if cfg.refusal_tokens:
        ids = [rt.tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in cfg.refusal_tokens]
        return ids, {"tokens": cfg.refusal_tokens, "token_ids": ids, "source": "user"}
    ids, info = derive_refusal_tokens(rt.tokenizer, refusals)
    info["source"] = "greedy refusals on the screened harmful training pool"
    return ids, info


def _pick(prompts: list[Prompt], keep: list[bool], n_train: int, need: int):
    """Train and val prompts among the kept ones, topped up in order with unkept ones when too few
    survive; also how many were kept and the training prompts' screen rows."""
    kept = [i for i, k in enumerate(keep) if k]
    if len(kept) < need:
        kept += [i for i, k in enumerate(keep) if not k][: need - len(kept)]
    return (
        [prompts[i] for i in kept[:n_train]],
        [prompts[i] for i in kept[n_train:need]],
        sum(keep),
        kept[:n_train],
    )


@dataclass
class _Verdicts:
    """What the screen measured on the screened prompts: the refusal metric and the generation judge."""

    h_metric: torch.Tensor  # [n_harmful_screened] refusal log-odds at the first token
    l_metric: torch.Tensor  # [n_harmless_screened]
    h_gen: list[bool]  # greedy completion judged a refusal
    l_gen: list[bool]


def _filter_rule(cfg: RunConfig, v: _Verdicts) -> tuple[str, float, list[bool], float, float]:
    """The filter the run uses (``auto``: the paper's metric rule when it agrees with generation on >= 90%
    of harmful prompts), its agreement, the metric's harmful keep mask and the calibrated threshold."""
    m_keep_h = (v.h_metric > 0).tolist()
    agreement = sum(a == b for a, b in zip(m_keep_h, v.h_gen)) / len(v.h_gen)
    rule = cfg.filter if cfg.filter != "auto" else ("metric" if agreement >= 0.9 else "generation")
    tau, tau_acc = calibrate_threshold(torch.cat([v.h_metric, v.l_metric]), v.h_gen + v.l_gen)
    if rule == "metric" and agreement >= 0.9:
        tau = 0.0  # the paper's threshold is calibrated for this model: keep it
    return rule, agreement, m_keep_h, tau, tau_acc


def _keep_masks(
    rule: str, cfg: RunConfig, v: _Verdicts, m_keep_h: list[bool]
) -> tuple[list[bool], list[bool]]:
    if rule == "metric":
        return m_keep_h, (v.l_metric < 0).tolist()
    if rule == "generation":
        return v.h_gen, [not r for r in v.l_gen]
    if rule == "none":
        return [True] * len(v.h_gen), [True] * len(v.l_gen)
    raise RefdirError(f"unknown --filter '{cfg.filter}' (use auto, metric, generation or none)")


def prepare_prompts(
    rt: Runtime, cfg: RunConfig, recorder: PostActivationRecorder | None = None
) -> ScreenedPrompts:
    """Train/val/eval splits after the paper's filtering, the refusal tokens, and what was measured.

    Filtering keeps harmful prompts the model refuses and harmless ones it answers. Two rules:
    ``metric`` (refusal log-odds > 0 / < 0, the paper's) and ``generation`` (greedy completion
    judged by refusal phrases). ``auto`` uses the metric rule when it agrees with generation on
    at least 90% of the harmful prompts, and generation otherwise (on Qwen2.5-0.5B the metric keeps
    11 of 128 harmful prompts although the model refuses about half).

    With a ``recorder`` attached, the screen's prompt passes also record the post-instruction
    activations (harmful prompt i as row i, harmless prompt i as row ``HARMLESS_ROW + i``) and the
    returned ``train_rows`` say which rows are the training prompts: extraction is then free.
    """
    sets = validate_inputs(cfg)
    ce_pairs = load_text_pairs(cfg.ce_text) if cfg.ce_text else []  # checked by validate_inputs
    need = cfg.n_train + cfg.n_val
    harm, harmless = sets["harmful"], sets["harmless"]
    # enough refusals to fill train+val with a margin (the generation rule is the inclusive one)
    target = need + need // 8
    with recorder.attached() if recorder is not None else contextlib.nullcontext():
        hl, hc = _screen_until(rt, harm, is_refusal, target, need, "screen harmful", 0, recorder)
        answers = lambda c: not is_refusal(c)  # noqa: E731
        ll, lc = _screen_until(rt, harmless, answers, target, need, "screen harmless", HARMLESS_ROW, recorder)
    harm, harmless = harm[: len(hc)], harmless[: len(lc)]
    ids, tok_info = _refusal_tokens(rt, cfg, hc)
    idt = torch.tensor(ids)
    v = _Verdicts(
        refusal_metric(hl, idt),
        refusal_metric(ll, idt),
        [is_refusal(c) for c in hc],
        [is_refusal(c) for c in lc],
    )
    if sum(v.h_gen) / len(v.h_gen) < cfg.min_refusal_rate:
        raise RefdirError(
            f"the model barely refuses: {sum(v.h_gen)} of {len(v.h_gen)} harmful prompts refused "
            f"by greedy generation (< {cfg.min_refusal_rate:.0%}); "
            "there is no refusal behaviour to find a direction for"
        )
    rule, agreement, m_keep_h, tau, tau_acc = _filter_rule(cfg, v)
    keep_h, keep_l = _keep_masks(rule, cfg, v, m_keep_h)
    htr, hva, hk, h_rows = _pick(harm, keep_h, cfg.n_train, need)
    ltr, lva, lk, l_rows = _pick(harmless, keep_l, cfg.n_train, need)
    data = {
        "harmful_train": [p.to_json() for p in htr],
        "harmful_val": [p.to_json() for p in hva],
        "harmless_train": [p.to_json() for p in ltr],
        "harmless_val": [p.to_json() for p in lva],
        "eval_harmful": [p.to_json() for p in sets["eval_harmful"]],
        "eval_harmless": [p.to_json() for p in sets["eval_harmless"]],
        "ce_text": [{"instruction": i, "response": r} for i, r in ce_pairs],
        "refusal_tokens": tok_info,
        # log-odds above which the model's own generations are refusals: the induce threshold
        "metric_threshold": round(float(tau), 4),
        "metric_threshold_accuracy": round(float(tau_acc), 4),
        "filter": {
            "rule": rule,
            "requested": cfg.filter,
            "metric_generation_agreement": round(agreement, 4),
            "harmful_screened": len(harm),
            "harmless_screened": len(harmless),
            "harmful_kept": hk,
            "harmless_kept": lk,
            "harmful_kept_by_metric": int(sum(m_keep_h)),
            "harmful_refused_by_generation": int(sum(v.h_gen)),
            "harmless_refused_by_generation": int(sum(v.l_gen)),
            "harmful_topped_up": max(0, need - hk),
            "harmless_topped_up": max(0, need - lk),
        },
        "prompt_format": {
            **rt.fmt.to_json(),
            "example": format_prompt(rt.tokenizer, "<instruction>", rt.fmt),
            "post_instruction_tokens": post_instruction_tokens(rt.tokenizer, rt.fmt),
        },
    }
    return ScreenedPrompts(data, {"harmful": h_rows, "harmless": [HARMLESS_ROW + i for i in l_rows]})


def calibrate_threshold(metric: torch.Tensor, refused: list[bool]) -> tuple[float, float]:
    """The refusal-metric threshold that best separates generated refusals from answers.

    The paper's 0 assumes P(refusal tokens) > 0.5 when the model refuses; weak models refuse with
    P("I") of 0.2-0.5, so the calibrated threshold is what "induce" has to exceed for them.
    Returns (threshold, accuracy of ``metric > threshold`` against the generations).
    """
    vals = sorted(set(metric.tolist()))
    cuts = [vals[0] - 1.0] + [(a + b) / 2 for a, b in zip(vals, vals[1:])] + [vals[-1] + 1.0]
    y = torch.tensor(refused)
    best = max((float((((metric > c) == y).float()).mean()), -abs(c), c) for c in cuts)
    return best[2], best[0]
