"""The stages of ``refdir run``, declared once: what each computes, from which inputs, into which files.

prompts (:mod:`refdir.method.screen`) -> extract (:mod:`refdir.method.activations`,
:mod:`refdir.method.directions`) -> select (:mod:`refdir.method.selection`) -> [capabilities, baseline
half] -> evaluate (:mod:`refdir.evaluation.direction_eval`; orthogonalizes the run's own model) ->
[capabilities, orthogonalized half] -> report.

Each stage is a plain function of typed inputs returning a typed artifact (``screen_prompts`` ->
:class:`PromptsArtifact`, ``extract_candidates`` -> :class:`Candidates`, ``choose_direction`` ->
:class:`Selected`, ``evaluate`` -> :class:`~refdir.evaluation.direction_eval.Evaluation`), and a
:class:`Stage` row of :data:`STAGES` says which settings and which upstream files key it and which
files it leaves. A stage whose key is unchanged and whose files exist is reused, so a killed run resumes
and any stage can run alone on a folder that holds its inputs.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from refdir.core.io import load_tensors, save_tensors, write_json, write_jsonl
from refdir.core.runtime import Runtime
from refdir.core.templates import post_instruction_tokens
from refdir.evaluation.direction_eval import check_orthogonalized, evaluate_conditions, instructions
from refdir.evaluation.verdicts import is_probe, probe_path, resolve_judge
from refdir.method.activations import PostActivationRecorder, mean_activations
from refdir.method.cosmic import select_direction_cosmic
from refdir.method.directions import (
    Direction,
    candidate_directions,
    direction_from_candidates,
    load_direction,
)
from refdir.method.screen import prepare_prompts
from refdir.method.selection import SelectionConfig, paper_scores, require_choice, select_direction
from refdir.run.folder import RunFolder, file_hash
from refdir.run.settings import RunConfig


@dataclass
class StageContext:
    """What every stage receives: settings, the runtime, the folder, a log, and the run's own model."""

    cfg: RunConfig
    rt: Runtime
    folder: RunFolder
    log: Callable[[str], None]
    owned: Callable[[], Runtime]  # the model the run may edit (its own, or a copy of the caller's)
    orthogonalized: bool = False  # whether ``owned()``'s weights are orthogonalized already


# ----------------------------------------------------------------------------------------------
# artifacts and the functions that compute them


@dataclass
class PromptsArtifact:
    """``prompts.json`` and the training prompts' mean activations recorded by the screen."""

    data: dict
    means: tuple[torch.Tensor, torch.Tensor] | None  # [n_post, n_layers, d] each, float64
    n_post: int


@dataclass
class Candidates:
    """Difference-of-means candidates ``directions[p, l]`` (paper Eq. 1) and the means behind them."""

    directions: torch.Tensor  # [n_post, n_layers, d]
    mean_harmful: torch.Tensor  # [n_post, n_layers, d] float64
    mean_harmless: torch.Tensor
    meta: dict = field(default_factory=dict)


@dataclass
class Selected:
    """Every candidate's scores (``selection.json``) and the chosen direction."""

    selection: dict
    direction: Direction


def screen_prompts(rt: Runtime, cfg: RunConfig) -> PromptsArtifact:
    """Splits, filter, refusal tokens; the screen's passes record the training prompts' activations."""
    n_post = len(post_instruction_tokens(rt.tokenizer, cfg.fmt))
    recorder = PostActivationRecorder(rt.model, n_post)
    screened = prepare_prompts(rt, cfg, recorder)
    rows = screened.train_rows
    mh, ml = recorder.mean(rows["harmful"]), recorder.mean(rows["harmless"])
    means = (mh, ml) if mh is not None and ml is not None else None
    return PromptsArtifact(screened.data, means, n_post)


SEPARATE_PASS = "a separate extraction pass"


def extract_candidates(rt: Runtime, data: dict, screen_means: dict[str, torch.Tensor]) -> Candidates:
    """Mean activations at every layer and post-instruction position: the screen's if it recorded them for
    these positions, else a separate pass (equal to 1e-4, tested)."""
    hb, lb = rt.encode(instructions(data["harmful_train"])), rt.encode(instructions(data["harmless_train"]))
    n_post = min(hb.n_post, lb.n_post)
    source = "the prompt screen's forward passes (screen_means.safetensors)"
    if screen_means and screen_means["mean_harmful"].shape[0] == n_post:
        mh, ml = screen_means["mean_harmful"], screen_means["mean_harmless"]
    else:
        source = SEPARATE_PASS
        mh = mean_activations(rt.model, hb, n_post, rt.batch.prompt_rows, desc="extract harmful")
        ml = mean_activations(rt.model, lb, n_post, rt.batch.prompt_rows, desc="extract harmless")
    meta = {
        "shape": [n_post, mh.shape[1], mh.shape[2]],
        "axes": ["position", "layer", "d_model"],
        "positions": list(range(-n_post, 0)),
        "post_instruction_tokens": data["prompt_format"]["post_instruction_tokens"],
        "n_harmful": len(data["harmful_train"]),
        "n_harmless": len(data["harmless_train"]),
        "activation": "resid_pre (input of each decoder layer)",
        "accumulation": "float64 mean",
        "recorded_by": source,
    }
    return Candidates(candidate_directions(mh, ml), mh, ml, meta)


def selection_config(cfg: RunConfig, rt: Runtime, data: dict) -> SelectionConfig:
    """The run's selection settings, with the runtime's rows per pass and, when the induce threshold is
    automatic, the refusal threshold the screen calibrated on this model."""
    sel_cfg = dataclasses.replace(cfg.selection, batch_rows=rt.batch.select_rows)
    if sel_cfg.induce_threshold is None:
        sel_cfg = SelectionConfig(**{**sel_cfg.to_json(), "induce_threshold": data["metric_threshold"]})
    return sel_cfg


def choose_direction(
    rt: Runtime, cfg: RunConfig, data: dict, candidates: torch.Tensor, spec: str
) -> Selected:
    """Score every candidate (bypass, induce, KL; or COSMIC's cosines) and take the paper's choice."""
    t = time.time()
    model, ref_ids = rt.model, data["refusal_tokens"]["token_ids"]
    hv, lv = rt.encode(instructions(data["harmful_val"])), rt.encode(instructions(data["harmless_val"]))
    sel_cfg = selection_config(cfg, rt, data)
    if sel_cfg.selector == "cosmic":
        htr = rt.encode(instructions(data["harmful_train"]))
        ltr = rt.encode(instructions(data["harmless_train"]))
        res = select_direction_cosmic(model, candidates, hv, lv, htr, ltr, sel_cfg)
    else:
        res = select_direction(model, candidates, hv, lv, ref_ids, sel_cfg)
    sel = {**res.to_json(), "seconds": round(time.time() - t, 2), "config": sel_cfg.to_json()}
    p, l = require_choice(res)
    if sel_cfg.selector == "cosmic":  # and the paper's scores of the same candidate, to compare the selectors
        paper = paper_scores(model, candidates, p, l, hv, lv, ref_ids, sel_cfg)
        scores = {
            "cosmic_refusal": float(res.bypass[p, l]),
            "cosmic_steering": float(res.induce[p, l]),
            "kl": float(res.kl[p, l]),
            **paper,
        }
    else:
        kinds = {"bypass": res.bypass, "induce": res.induce, "kl": res.kl}
        scores = {**{k: float(v[p, l]) for k, v in kinds.items()}, **res.baseline}
    d = direction_from_candidates(candidates, p, l, spec, scores)
    d.extra = {
        "token": data["prompt_format"]["post_instruction_tokens"][p],
        "refusal_tokens": data["refusal_tokens"]["tokens"],
        "seed": cfg.seed,
        "sizes": {"n_train": cfg.n_train, "n_val": cfg.n_val, "n_eval": cfg.n_eval},
        "prompt_format": data["prompt_format"],
    }
    return Selected(sel, d)


# ----------------------------------------------------------------------------------------------
# the stages over the run folder: read inputs, compute, write the artifact


def _read(folder: RunFolder) -> dict:
    return json.loads(folder.prompts.read_text())


def _spec(ctx: StageContext) -> str:
    return ctx.rt.spec or ctx.cfg.model


def run_prompts(ctx: StageContext) -> None:
    ctx.log("prompts: splitting, filtering and deriving refusal tokens")
    art = screen_prompts(ctx.rt, ctx.cfg)
    ctx.folder.screen_means.unlink(missing_ok=True)
    if art.means is not None:
        save_tensors(
            ctx.folder.screen_means,
            {"mean_harmful": art.means[0], "mean_harmless": art.means[1]},
            metadata={"model": _spec(ctx), "n_post": str(art.n_post)},
        )
    write_json(ctx.folder.prompts, art.data)


def run_extract(ctx: StageContext) -> None:
    ctx.log("extract: mean activations at every layer and post-instruction position")
    screened = ctx.folder.screen_means
    c = extract_candidates(ctx.rt, _read(ctx.folder), load_tensors(screened) if screened.exists() else {})
    if c.meta["recorded_by"] != SEPARATE_PASS:
        ctx.log(f"extract: means recorded by {c.meta['recorded_by']}")
    save_tensors(
        ctx.folder.candidates,
        {"directions": c.directions, "mean_harmful": c.mean_harmful, "mean_harmless": c.mean_harmless},
        metadata={"model": _spec(ctx)},
    )
    write_json(ctx.folder.candidates_meta, {"model": _spec(ctx), **c.meta})


def run_select(ctx: StageContext) -> None:
    candidates = load_tensors(ctx.folder.candidates)["directions"]
    ctx.log(f"select: scoring {candidates.shape[0] * candidates.shape[1]} candidate directions")
    s = choose_direction(ctx.rt, ctx.cfg, _read(ctx.folder), candidates, _spec(ctx))
    write_json(ctx.folder.selection, s.selection)
    s.direction.save(ctx.folder.direction)


def run_evaluate(ctx: StageContext) -> None:
    """Hooks on the shared model, then the orthogonalization check on the run's own model."""
    t = time.time()
    ctx.log("evaluate: generating completions under each condition")
    data = _read(ctx.folder)
    direction = load_direction(ctx.folder.path, expect_d_model=ctx.rt.adapter.d_model)
    out = evaluate_conditions(ctx.rt, direction, data, ctx.cfg, ctx.log)
    check_orthogonalized(ctx.owned(), direction, data, ctx.cfg, out, ctx.log)
    ctx.orthogonalized = True
    order = ("direction", "refusal", "kl_ce_harmless", "ce_harmless_text", "ortho_check", "judge")
    ev = {**{k: out.ev[k] for k in order}, **out.ev, "seconds": round(time.time() - t, 2)}
    write_jsonl(ctx.folder.completions, out.rows)
    write_json(ctx.folder.eval, ev)


def _settings_prompts(cfg: RunConfig) -> dict:
    data = [cfg.harmful, cfg.harmless, cfg.eval_harmful, cfg.eval_harmless, cfg.prompt_field, cfg.ce_text]
    return {
        "data": data,
        "sizes": [cfg.n_train, cfg.n_val, cfg.n_eval],
        "seed": cfg.seed,
        "filter": cfg.filter,
        "refusal_tokens": cfg.refusal_tokens,
        "min_refusal_rate": cfg.min_refusal_rate,
    }


def _settings_select(cfg: RunConfig) -> dict:
    # rows per pass change float rounding only; the default selector keeps older run folders' keys
    sel = cfg.selection.to_json().items()
    return {"sel": {k: v for k, v in sel if k != "batch_rows" and not (k == "selector" and v == "paper")}}


def judge_key(spec: str | None) -> str | None:
    """What keys the evaluate stage for a second judge: its spec, and for a probe the digest of its
    file as well, so a probe retrained in place (or a new shipped one) reruns the verdicts rather than
    leaving the old probe's numbers under the new probe's name."""
    if spec is None or not is_probe(spec):
        return spec
    from refdir.evaluation.probe_judge import DEFAULT_PROBE

    path = Path(probe_path(spec) or DEFAULT_PROBE)
    return f"{spec}#{file_hash(path)}" if path.is_file() else spec


def _settings_evaluate(cfg: RunConfig) -> dict:
    # the judge that will run: "auto" keys as the probe once it can run here, so the stage reruns then
    judge = judge_key(resolve_judge(cfg.judge)[0])
    key = {"max_new_tokens": cfg.max_new_tokens, "ortho": cfg.regenerate_ortho, "judge": judge}
    if cfg.judge_model:  # an endpoint's served model: absent otherwise, so earlier folders keep their key
        key["judge_model"] = cfg.judge_model
    # XSTest prompts per set: absent when off, so folders evaluated without it keep their key
    return {**key, "overrefusal_n": cfg.overrefusal_n} if cfg.overrefusal_n else key


@dataclass(frozen=True)
class Stage:
    """One row of the stage table.

    ``inputs`` are run-folder files (:class:`RunFolder` property names) whose content keys the stage (an
    absent one keys as None); ``settings`` the run settings that key it; ``artifacts`` the files it
    leaves, all present when it is complete; ``run`` computes and writes them.
    """

    name: str
    inputs: tuple[str, ...]
    settings: Callable[[RunConfig], dict]
    artifacts: tuple[str, ...]
    run: Callable[[StageContext], None]


STAGES: tuple[Stage, ...] = (
    Stage("prompts", (), _settings_prompts, ("prompts",), run_prompts),
    Stage("extract", ("prompts", "screen_means"), lambda cfg: {}, ("candidates",), run_extract),
    Stage("select", ("candidates", "prompts"), _settings_select, ("selection", "direction"), run_select),
    Stage("evaluate", ("direction", "prompts"), _settings_evaluate, ("eval", "completions"), run_evaluate),
)
