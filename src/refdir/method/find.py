"""``find_direction``: the refusal direction in memory, for notebooks and scripts.

The same three stages as ``refdir run`` (:func:`refdir.run.pipeline.run_pipeline`, stages 1-3), calling the
same functions with the same arguments: the prompt screen (:func:`~refdir.method.screen.prepare_prompts`,
recording the training prompts' activations as it goes), extraction (the screen's means, or a separate
:func:`~refdir.method.activations.mean_activations` pass) and selection (the paper's or COSMIC's). No run
folder, no evaluation conditions, no orthogonalization: on the same inputs and settings it returns the
direction ``refdir run`` writes to ``direction.safetensors`` / ``direction.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from refdir.core.adapter import get_adapter
from refdir.core.errors import RefdirError
from refdir.core.runtime import BatchPolicy, Runtime
from refdir.core.templates import format_prompt, post_instruction_tokens
from refdir.core.types import Model, Tokenizer
from refdir.method.activations import PostActivationRecorder, mean_activations
from refdir.method.cosmic import select_direction_cosmic
from refdir.method.data import Prompt
from refdir.method.directions import Direction, candidate_directions, direction_from_candidates
from refdir.method.screen import prepare_prompts
from refdir.method.selection import SelectionConfig, paper_scores, require_choice, select_direction
from refdir.run.settings import RunConfig, resolve

PromptSource = str | Sequence[str | Prompt]  # a dataset spec ("builtin:harmful", a file) or the prompts


def find_direction(
    model_or_runtime: Runtime | Model | str | tuple[Model, Tokenizer],
    harmful: PromptSource,
    harmless: PromptSource,
    tokenizer: Tokenizer | None = None,
    *,
    preset: str | None = None,
    log: Callable[[str], None] | None = None,
    **settings: Any,
) -> Direction:
    """Screen prompts, extract the candidate directions and select one, in memory.

    ``model_or_runtime``: a :class:`~refdir.core.runtime.Runtime`, a loaded model (pass ``tokenizer``), a
    ``(model, tokenizer)`` pair as :func:`~refdir.core.models.load_model` returns it, or a model spec that
    is loaded as ``refdir run --model`` loads it. ``harmful`` / ``harmless``: dataset specs as the
    ``--harmful`` flag takes them, or lists of strings or :class:`~refdir.method.data.Prompt`.
    ``settings``: any :class:`~refdir.run.settings.RunConfig` or
    :class:`~refdir.run.settings.SelectionConfig` field (``n_train=32``, ``induce_threshold=-1e9``,
    ``selector="cosmic"``), read as the CLI reads its flags, over ``preset`` ("quick", "paper").

    Returns the chosen :class:`~refdir.method.directions.Direction` with its selection scores and
    provenance (``scores``, ``extra``) as ``direction.json`` records them; raises
    :class:`~refdir.core.errors.RefdirError` when every candidate is filtered out.
    """
    say = log or (lambda message: None)
    cfg = settings_for(preset, settings)
    if isinstance(model_or_runtime, str):
        cfg = dataclasses.replace(cfg, model=model_or_runtime)
    rt = runtime_for(model_or_runtime, tokenizer, cfg).with_format(cfg.fmt)
    get_adapter(model_of(rt))  # unsupported architecture: fail before the screen
    format_prompt(rt.tokenizer, "x", cfg.fmt)  # no chat template: likewise
    with prompt_sources(cfg, harmful, harmless) as cfg:
        say("prompts: splitting, filtering and deriving refusal tokens")
        data, means = screen(rt, cfg)
    say("extract: mean activations at every layer and post-instruction position")
    candidates = extract(rt, data, means)  # [n_post, n_layers, d]
    say(f"select: scoring {candidates.shape[0] * candidates.shape[1]} candidate directions")
    spec = rt.spec or settings.get("model") or (cfg.model if isinstance(model_or_runtime, str) else "")
    return select(rt, cfg, data, candidates, spec)


def settings_for(preset: str | None, settings: dict[str, Any]) -> RunConfig:
    """The run configuration ``refdir run --preset PRESET --flag value ...`` resolves to."""
    run_names = {f.name for f in fields(RunConfig)} - {"selection"}
    selection_names = {f.name for f in fields(SelectionConfig)}
    given: dict[str, Any] = {}
    for name, value in settings.items():
        if name in run_names:
            given[name] = value
        elif name in selection_names:
            given[f"selection.{name}"] = value
        else:
            raise RefdirError(
                f"unknown setting '{name}' (settings: {', '.join(sorted(run_names | selection_names))})"
            )
    return resolve(given, preset=preset)


def runtime_for(
    model_or_runtime: Runtime | Model | str | tuple[Model, Tokenizer],
    tokenizer: Tokenizer | None,
    cfg: RunConfig,
) -> Runtime:
    """The runtime ``run_pipeline`` would build: given, loaded from a spec, or around a loaded model."""
    if isinstance(model_or_runtime, Runtime):
        return model_or_runtime
    if isinstance(model_or_runtime, str):
        return Runtime.load(cfg.model, cfg.fmt, cfg.batch_policy(), **cfg.load_options())
    if isinstance(model_or_runtime, tuple):
        model_or_runtime, tokenizer = model_or_runtime
    if tokenizer is None:
        raise RefdirError(
            "find_direction needs the tokenizer with a model: find_direction(model, ..., tokenizer=tok)"
        )
    return Runtime(model_or_runtime, tokenizer, cfg.fmt, cfg.batch_policy() or BatchPolicy())


@contextlib.contextmanager
def prompt_sources(cfg: RunConfig, harmful: PromptSource, harmless: PromptSource) -> Iterator[RunConfig]:
    """``cfg`` with ``harmful`` / ``harmless`` as the dataset specs the prompt screen reads.

    A spec passes through; a list is written for the context's duration to a temporary JSON file (removed
    on exit), so it goes through the very loader and checks (blank, duplicate prompts) a file would."""
    with tempfile.TemporaryDirectory(prefix="refdir-prompts-") as tmp:
        specs = {}
        for side, source in (("harmful", harmful), ("harmless", harmless)):
            if isinstance(source, str):
                specs[side] = source
                continue
            items = [(p if isinstance(p, Prompt) else Prompt(str(p))).to_json() for p in source]
            path = Path(tmp) / f"{side}.json"
            path.write_text(json.dumps(items, ensure_ascii=False), encoding="utf-8")
            specs[side] = str(path)
        yield dataclasses.replace(cfg, harmful=specs["harmful"], harmless=specs["harmless"])


def model_of(rt: Runtime) -> Model:
    """The runtime's model under its type name (``Runtime`` annotates it as a plain module)."""
    model: Any = rt.model
    return model


def plain_json(obj: Any) -> Any:
    """``obj`` as it reads back from the run folder's JSON (lists for tuples, numbers for 0-d tensors)."""
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def screen(rt: Runtime, cfg: RunConfig) -> tuple[dict[str, Any], tuple[torch.Tensor, torch.Tensor] | None]:
    """Stage 1: the screened splits (``prompts.json``'s content) and the training prompts' mean activations
    ``([n_post, n_layers, d], [n_post, n_layers, d])`` float64 recorded by the screen (None if it could
    not)."""
    n_post = len(post_instruction_tokens(rt.tokenizer, cfg.fmt))
    recorder = PostActivationRecorder(model_of(rt), n_post)
    screened: Any = prepare_prompts(rt, cfg, recorder)
    if isinstance(screened, dict):  # the screen's older return value: the rows under "_train_rows"
        data, rows = screened, screened.pop("_train_rows")
    else:
        data, rows = screened.data, screened.train_rows
    mh, ml = recorder.mean(rows["harmful"]), recorder.mean(rows["harmless"])
    del recorder  # its buffers: the screen's activations
    return plain_json(data), (mh, ml) if mh is not None and ml is not None else None


def instructions(items: list[dict[str, Any]]) -> list[str]:
    return [x["instruction"] for x in items]


def extract(
    rt: Runtime, data: dict[str, Any], means: tuple[torch.Tensor, torch.Tensor] | None
) -> torch.Tensor:
    """Stage 2: the candidate directions ``[n_post, n_layers, d]`` float32, from the screen's means when
    they cover every post-instruction position, else from a separate extraction pass."""
    hb, lb = rt.encode(instructions(data["harmful_train"])), rt.encode(instructions(data["harmless_train"]))
    n_post = min(hb.n_post, lb.n_post)
    if means is not None and means[0].shape[0] == n_post:
        mh, ml = means
    else:
        mh = mean_activations(model_of(rt), hb, n_post, rt.batch.prompt_rows, desc="extract harmful")
        ml = mean_activations(model_of(rt), lb, n_post, rt.batch.prompt_rows, desc="extract harmless")
    return candidate_directions(mh, ml)


def select(
    rt: Runtime, cfg: RunConfig, data: dict[str, Any], candidates: torch.Tensor, spec: str
) -> Direction:
    """Stage 3: score the candidates on the validation prompts and pick one, with its scores and
    provenance as ``direction.json`` records them."""
    model = model_of(rt)
    hv, lv = rt.encode(instructions(data["harmful_val"])), rt.encode(instructions(data["harmless_val"]))
    ref_ids = data["refusal_tokens"]["token_ids"]
    sel_cfg = dataclasses.replace(cfg.selection, batch_rows=rt.batch.select_rows)
    if sel_cfg.induce_threshold is None:  # auto: the calibrated refusal threshold of this model
        sel_cfg = SelectionConfig(**{**sel_cfg.to_json(), "induce_threshold": data["metric_threshold"]})
    if sel_cfg.selector == "cosmic":
        htr = rt.encode(instructions(data["harmful_train"]))
        ltr = rt.encode(instructions(data["harmless_train"]))
        res = select_direction_cosmic(model, candidates, hv, lv, htr, ltr, sel_cfg)
    else:
        res = select_direction(model, candidates, hv, lv, ref_ids, sel_cfg)
    p, l = require_choice(res)
    if sel_cfg.selector == "cosmic":  # and the paper's scores of the same candidate, to compare selectors
        paper = paper_scores(model, candidates, p, l, hv, lv, ref_ids, sel_cfg)
        scores = {
            "cosmic_refusal": float(res.bypass[p, l]),
            "cosmic_steering": float(res.induce[p, l]),
            "kl": float(res.kl[p, l]),
            **paper,
        }
    else:
        scores = {
            "bypass": float(res.bypass[p, l]),
            "induce": float(res.induce[p, l]),
            "kl": float(res.kl[p, l]),
            **res.baseline,
        }
    d = direction_from_candidates(candidates, p, l, spec, plain_json(scores))
    d.extra = plain_json(
        {
            "token": data["prompt_format"]["post_instruction_tokens"][p],
            "refusal_tokens": data["refusal_tokens"]["tokens"],
            "seed": cfg.seed,
            "sizes": {"n_train": cfg.n_train, "n_val": cfg.n_val, "n_eval": cfg.n_eval},
            "prompt_format": data["prompt_format"],
        }
    )
    return d
