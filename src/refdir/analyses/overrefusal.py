"""``refdir overrefusal`` on a finished run: find the false-refusal direction (Wang et al., ICLR 2025;
:mod:`refdir.method.overrefusal`) from pseudo-harmful prompts, and evaluate its ablation on XSTest's safe
prompts and the run's harmful ones (:mod:`refdir.evaluation.overrefusal_eval`).

The pseudo-harmful prompts train the direction (their held-out part scores the candidates); XSTest's safe
prompts only test it: no prompt both trains and tests (checked). Writes into the run folder
``overrefusal_direction.safetensors`` (+ its ``.json``), ``overrefusal.json`` (numbers, the whole
selection table) and ``overrefusal_completions.jsonl``.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from refdir.core.errors import RefdirError
from refdir.core.io import load_tensors, write_json, write_jsonl
from refdir.core.prefix import last_logits_shared, split_prefix
from refdir.core.runtime import Runtime
from refdir.evaluation.overrefusal_eval import EvalPrompts, evaluate_false_refusal, reusable_completions
from refdir.evaluation.xstest import stratified
from refdir.method.activations import mean_activations
from refdir.method.data import Prompt, load_prompts, split_prompts
from refdir.method.directions import Direction
from refdir.method.overrefusal import (
    FalseRefusalScorer,
    OverrefusalConfig,
    false_refusal_candidates,
    keep_refused,
    select_false_refusal,
)
from refdir.method.refusal import refusal_metric
from refdir.run.folder import RunFolder

NEEDED = ("refusal_tokens", "harmful_train", "harmless_train", "harmful_val", "harmless_val", "eval_harmful")


@dataclass(frozen=True)
class OverrefusalSettings:
    """What ``refdir overrefusal`` does: the direction's settings, its training prompts, and the evaluation
    (``xstest_n`` of the ``xstest`` prompts, stratified by type as the run's evaluation takes them; ``judge``:
    a second judge spec)."""

    config: OverrefusalConfig = field(default_factory=OverrefusalConfig)
    pseudo_harmful: str = "builtin:pseudo-harmful"
    xstest: str = "builtin:xstest-safe"
    xstest_n: int = 50
    judge: str | None = None
    skip_eval: bool = False


def check_inputs(run: RunFolder, s: OverrefusalSettings) -> tuple[dict, list[Prompt], list[Prompt]]:
    """The run's prompts, the pseudo-harmful prompts and the XSTest sample, checked before any model loads:
    a bad folder or source fails in a second, and nothing is written."""
    if not run.prompts.is_file():
        raise RefdirError(f"{run.path} has no prompts.json: run `refdir run --out {run.path}` first")
    if not run.candidates.is_file():
        raise RefdirError(f"{run.path} has no candidates.safetensors: run `refdir extract --out {run.path}`")
    data = json.loads(run.prompts.read_text())
    missing = [k for k in NEEDED if k not in data]
    if missing:
        raise RefdirError(f"{run.prompts} lacks {', '.join(missing)}: rerun `refdir run --out {run.path}`")
    pseudo = load_prompts(s.pseudo_harmful)
    if len(pseudo) < 8:
        raise RefdirError(
            f"{s.pseudo_harmful}: {len(pseudo)} prompts; the false-refusal direction needs >= 8"
        )
    xstest: list[Prompt] = []
    if not s.skip_eval:
        every = load_prompts(s.xstest)
        both = {p.instruction.strip() for p in pseudo} & {p.instruction.strip() for p in every}
        if both:
            raise RefdirError(
                f"{len(both)} prompts are both in {s.pseudo_harmful} (training) and {s.xstest} (test), e.g. "
                f"'{sorted(both)[0][:60]}': remove them from one set"
            )
        xstest = stratified(every, s.xstest_n)  # the run evaluation's subset for the same n
    return data, pseudo, xstest


def _texts(items: list) -> list[str]:
    return [x.instruction if isinstance(x, Prompt) else x["instruction"] for x in items]


def _kept_prompts(rt: Runtime, data: dict, train: list[Prompt], cfg: OverrefusalConfig) -> tuple[list, dict]:
    """The training prompts the model refuses at baseline (:func:`keep_refused`) and the rule's record."""
    if "metric_threshold" in data:
        threshold, source = float(data["metric_threshold"]), "the run's calibrated refusal threshold"
    else:
        threshold, source = 0.0, "0 (the paper's; the run records no calibrated threshold)"
    logits = last_logits_shared(rt.model, split_prefix(rt.encode(_texts(train)), True, rt.model))  # [N, V]
    metric = refusal_metric(logits, torch.tensor(data["refusal_tokens"]["token_ids"])).cpu()
    kept, record = keep_refused(metric, threshold, cfg.keep_frac, cfg.min_keep)
    record["threshold_source"] = source
    record["kept_per_category"] = dict(Counter(train[i].category or "uncategorized" for i in kept))
    return [train[i] for i in kept], record


def find_false_refusal(
    run: RunFolder,
    rt: Runtime,
    refusal: Direction,
    pseudo: list[Prompt],
    data: dict,
    cfg: OverrefusalConfig = OverrefusalConfig(),
    progress: bool = True,
) -> tuple[Direction | None, dict]:
    """The false-refusal direction of the run's model (None when no candidate passes) and the record of
    how it was found: the split, the kept-prompt rule, the whole selection table."""
    n_val = min(cfg.n_val, len(pseudo) // 4)
    train, val = split_prompts(pseudo, [len(pseudo) - n_val, n_val], cfg.seed, "pseudo-harmful prompts")
    kept, kept_record = _kept_prompts(rt, data, train, cfg)
    stored = load_tensors(run.candidates)
    n_post = stored["directions"].shape[0]
    mean_pseudo = mean_activations(rt.model, rt.encode(_texts(kept)), n_post, rt.batch.prompt_rows)
    mean_harmless = stored.get("mean_harmless")
    harmless_source = "the run's candidates.safetensors"
    if mean_harmless is None or mean_harmless.shape != mean_pseudo.shape:
        harmless_source = "a separate pass over the run's harmless training prompts"
        hb = rt.encode(_texts(data["harmless_train"]))
        mean_harmless = mean_activations(rt.model, hb, n_post, rt.batch.prompt_rows)
    v = false_refusal_candidates(mean_pseudo, mean_harmless, refusal.vector)  # [n_post, L, d] float64
    ids = data["refusal_tokens"]["token_ids"]
    scorer = FalseRefusalScorer(
        rt.model,
        rt.encode(_texts(val)),
        rt.encode(_texts(data["harmful_val"])),
        rt.encode(_texts(data["harmless_val"])),
        ids,
        rt.batch.select_rows,
    )
    sel = select_false_refusal(scorer, v, kept_record["threshold"], cfg, progress)
    record = {
        "pseudo_harmful": {"n": len(pseudo), "n_train": len(train), "n_val": len(val), "seed": cfg.seed},
        "kept": kept_record,
        "mean_harmless_from": harmless_source,
        "selection": {**sel.to_json(), "config": cfg.to_json(), "n_harmful_val": len(data["harmful_val"])},
    }
    if sel.chosen is None:
        return None, record
    p, l = sel.chosen
    r = refusal.vector.double() / refusal.vector.double().norm()
    vec = v[p, l]
    scores = {
        "false_refusal": float(sel.false_refusal[p, l]),
        "harmful": float(sel.harmful[p, l]),
        "kl": float(sel.kl[p, l]),
        **{f"baseline_{k}": x for k, x in sel.baseline.items()},
    }
    extra = {
        "kind": "false-refusal direction (Wang et al. 2025), orthogonal to the refusal direction",
        "refusal_direction": {"layer": refusal.layer, "pos": refusal.pos},
        "cos_with_refusal_direction": float(vec @ r / vec.norm()),
    }
    return Direction(vec.float(), l, p - n_post, rt.spec or refusal.model, scores, extra), record


def measure_overrefusal(
    run: RunFolder, rt: Runtime, refusal: Direction, s: OverrefusalSettings, progress: bool = True
) -> dict:
    """Find, save and (unless ``s.skip_eval``) evaluate the false-refusal direction of a finished run;
    returns ``overrefusal.json``'s content. No candidate passing is an error (the table is written)."""
    t = time.time()
    data, pseudo, xstest = check_inputs(run, s)
    old = run.overrefusal_direction  # a previous result must not outlive this one (export reads it)
    for f in (old, old.with_suffix(".json"), run.overrefusal_completions):
        f.unlink(missing_ok=True)
    fr, record = find_false_refusal(run, rt, refusal, pseudo, data, s.config, progress)
    res = {
        "format": 1,
        "model": rt.spec or refusal.model,
        "method": "false-refusal direction ablation (Wang et al., ICLR 2025)",
        "pseudo_harmful_source": s.pseudo_harmful,
        "refusal_direction": {"layer": refusal.layer, "pos": refusal.pos},
        **record,
        "direction": None,
        "evaluation": None,
    }
    if fr is None:
        write_json(run.overrefusal, {**res, "seconds": round(time.time() - t, 1)})
        raise RefdirError(explain_no_choice(record))
    fr.save(run.overrefusal_direction)
    res["direction"] = {"layer": fr.layer, "pos": fr.pos, "norm": float(fr.vector.norm()), **fr.scores}
    res["direction"]["cos_with_refusal_direction"] = fr.extra["cos_with_refusal_direction"]
    write_json(run.overrefusal, {**res, "seconds": round(time.time() - t, 1)})
    if not s.skip_eval:
        cfg = json.loads(run.config.read_text()) if run.config.is_file() else {}
        n_new = int(cfg.get("max_new_tokens", 64))
        harm = data["eval_harmful"]
        prompts = EvalPrompts(
            _texts(xstest),
            [p.category for p in xstest],
            _texts(harm),
            [x.get("category") for x in harm],
            _texts(data.get("eval_harmless") or data["harmless_val"]),
        )
        reused = reusable_completions(run.completions, run.eval, prompts, n_new, refusal)
        ev, rows = evaluate_false_refusal(rt, refusal, fr, prompts, n_new, reused, s.judge)
        res["evaluation"] = {"xstest_source": s.xstest, "n_xstest": len(xstest), **ev}
        write_jsonl(run.overrefusal_completions, rows)
    res["seconds"] = round(time.time() - t, 1)
    write_json(run.overrefusal, res)
    return res


def explain_no_choice(record: dict) -> str:
    """One line saying which filter removed how many candidates (from the record written beside it)."""
    sel = record["selection"]
    c = sel["counts"]
    return (
        f"no false-refusal candidate passed: {c.get('harmful', 0)} took the harmful refusal log-odds to <= "
        f"{sel['harmful_floor']:.3f}, {c.get('kl', 0)} moved harmless KL to >= {sel['kl_threshold']}; see "
        "overrefusal.json for every score (relax with --harmful-margin or --kl-threshold)"
    )
