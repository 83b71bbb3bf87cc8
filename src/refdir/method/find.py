"""``find_direction``: the refusal direction in memory, for notebooks and scripts.

The first three stages of ``refdir run``, through the very functions its stage table calls
(:mod:`refdir.run.stages`: ``screen_prompts``, ``extract_candidates``, ``choose_direction``) with their
artifacts kept in memory: the prompt screen (recording the training prompts' activations as it goes),
extraction (the screen's means, or a separate pass) and selection (the paper's or COSMIC's). No run folder,
no evaluation conditions, no orthogonalization: on the same inputs and settings it returns the direction
``refdir run`` writes to ``direction.safetensors`` / ``direction.json``, because it is the same code.
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

from refdir.core.adapter import get_adapter
from refdir.core.errors import RefdirError
from refdir.core.runtime import BatchPolicy, Runtime
from refdir.core.templates import format_prompt
from refdir.core.types import Model, Tokenizer
from refdir.method.data import Prompt
from refdir.method.directions import Direction
from refdir.method.selection import SelectionConfig
from refdir.run.settings import RunConfig, resolve
from refdir.run.stages import choose_direction, extract_candidates, screen_prompts

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
    ``--harmful`` flag takes them, or lists of strings or :class:`~refdir.method.data.Prompt`. As in
    ``refdir run``, ``n_eval`` prompts per side are held out of the training pool (unused here: that is
    what keeps the choice the run's).
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
    get_adapter(rt.model)  # unsupported architecture: fail before the screen
    format_prompt(rt.tokenizer, "x", cfg.fmt)  # no chat template: likewise
    spec = rt.spec or settings.get("model") or (cfg.model if isinstance(model_or_runtime, str) else "")
    with prompt_sources(cfg, harmful, harmless) as cfg:
        say("prompts, extract, select: the stages of refdir run, in memory")
        return run_stages(rt, cfg, spec)


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


def plain_json(obj: Any) -> Any:
    """``obj`` as it reads back from the run folder's JSON (lists for tuples, numbers for 0-d tensors): the
    later stages of ``refdir run`` read ``prompts.json`` back, and its direction comes from JSON."""
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def run_stages(rt: Runtime, cfg: RunConfig, spec: str) -> Direction:
    """Stages 1-3 of ``refdir run`` (:mod:`refdir.run.stages`), their artifacts kept in memory."""
    prompts = screen_prompts(rt, cfg)  # splits and the training prompts' means [n_post, n_layers, d] x 2
    data = plain_json(prompts.data)
    means = {} if prompts.means is None else dict(zip(("mean_harmful", "mean_harmless"), prompts.means))
    candidates = extract_candidates(rt, data, means).directions  # [n_post, n_layers, d]
    direction = choose_direction(rt, cfg, data, candidates, spec).direction
    direction.scores, direction.extra = plain_json(direction.scores), plain_json(direction.extra)
    return direction
