"""What every command shares: the one-line-error parser, the model and loading flags (from the settings
schema), the output check, and loading a run folder's inputs for a command that works on one.

Torch-free at import: ``refdir --help`` builds every parser from here; the heavy modules are imported
inside the functions that load a model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from refdir.core.errors import RefdirError
from refdir.core.prompt_format import PromptFormat, canonical_json_object
from refdir.run.folder import RunFolder
from refdir.run.settings import DEFAULT_MODEL, RunConfig, add_arguments, positive_int, read_value

if TYPE_CHECKING:
    from refdir.core.runtime import Runtime
    from refdir.method.directions import Direction

__all__ = [
    "Parser",
    "add_load_args",
    "analysis_inputs",
    "add_model_args",
    "check_direction_fits",
    "check_writable",
    "direction_file",
    "load_for_run",
    "load_options",
    "log",
    "positive_int",
    "print_summary",
    "prompt_format",
    "rate",
    "run_model_and_format",
    "run_prompts",
]


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (exit status 2, as every refdir error)."""

    def error(self, message: str) -> NoReturn:  # noqa: D401
        self.exit(2, f"refdir: error: {message} (see {self.prog} --help)\n")


def log(message: str) -> None:
    """Progress on stderr, so that stdout carries only the command's result."""
    print(f"[refdir] {message}", file=sys.stderr)


def add_model_args(p: argparse.ArgumentParser, from_run: bool = False) -> None:
    """The model, prompt-format and loading flags of the config schema (commands outside ``run``)."""
    add_arguments(p, ("model", "load"), suppress=False, model_default=None if from_run else DEFAULT_MODEL)
    if from_run:  # commands on a run folder: the run's model and prompt format unless overridden
        for act in p._actions:
            if act.dest == "model":
                act.help = "default: the run's model"


def add_load_args(p: argparse.ArgumentParser) -> None:
    add_arguments(p, ("load",), suppress=False)


def load_options(a: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :func:`refdir.core.models.load_model` that the model flags set."""
    return {f.name: getattr(a, f.name) for f in fields(RunConfig) if f.metadata.get("group") == "load"}


def prompt_format(a: argparse.Namespace) -> PromptFormat:
    """The prompt format the flags give (the chat template file read, the template variables canonical)."""
    template = next(f for f in fields(RunConfig) if f.name == "chat_template")
    return PromptFormat(
        system=a.system,
        chat_template=read_value(template, a.chat_template),
        template_kwargs=canonical_json_object(a.template_kwargs),
    )


def check_writable(path: Path) -> None:
    """Fail before heavy work when the output cannot be created (checked by a real probe file)."""
    parent = path if path.is_dir() else path.parent
    while not parent.exists():
        parent = parent.parent
    ok = parent.is_dir() and os.access(parent, os.W_OK)
    if ok:
        try:
            with tempfile.TemporaryFile(dir=parent):
                pass
        except OSError:
            ok = False
    if not ok:
        raise RefdirError(f"output location {path} is not writable; choose another --out")


def direction_file(source: str | Path) -> Path:
    """The file a direction argument names (a run folder's ``direction.safetensors``), for messages."""
    p = Path(source)
    return RunFolder(p).direction if p.is_dir() else p


def check_direction_fits(direction: Direction, source: str | Path, d_model: int, model: str | None) -> None:
    """The checks :func:`refdir.method.directions.load_direction` makes against a loaded model, for a
    direction read once before the model loaded: its width, and the model it was computed on."""
    p = direction_file(source)
    if direction.d_model != d_model:
        raise RefdirError(
            f"direction in {p} has size {direction.d_model} but the model's d_model is {d_model}"
        )
    if model and direction.model and direction.model != model:
        raise RefdirError(f"direction in {p} was computed on model '{direction.model}', not '{model}'")


def analysis_inputs(a: argparse.Namespace) -> tuple[list[str] | None, Path]:
    """A run-folder analysis (cone, monitor): its optional ``--prompts`` (read with ``--field``) and its
    ``--out``, checked writable, before anything loads."""
    from refdir.method.data import load_prompts

    prompts = [p.instruction for p in load_prompts(a.prompts, a.field)] if a.prompts else None
    out = Path(a.out)
    check_writable(out)
    return prompts, out


def run_prompts(run: RunFolder) -> dict:
    """The run's ``prompts.json`` (every split), or the error that says which command makes it."""
    if not run.prompts.is_file():
        raise RefdirError(f"{run.path} has no prompts.json: run `refdir run --out {run.path}` first")
    return json.loads(run.prompts.read_text())


def run_model_and_format(a: argparse.Namespace, run: RunFolder) -> tuple[str, PromptFormat]:
    """The model spec and prompt format of a command on a run folder: the run's own unless overridden."""
    cfg = json.loads(run.config.read_text()) if run.config.is_file() else {}
    spec = a.model or cfg.get("model")
    if not spec:
        raise RefdirError(f"{run.path} does not record its model; pass --model")
    fmt = prompt_format(a)
    if a.system is None and a.chat_template is None and a.template_kwargs is None:  # the run's own format
        fmt = PromptFormat(
            system=cfg.get("system"),
            chat_template=cfg.get("chat_template"),
            template_kwargs=canonical_json_object(cfg.get("template_kwargs")),
        )
    return spec, fmt


def load_for_run(a: argparse.Namespace, run: RunFolder) -> tuple[dict, Runtime, Direction]:
    """A command on a run folder: its prompts, the runtime (the run's model and prompt format unless
    overridden) and its direction, checked against the model. The folder's prompts and direction are
    read before the model loads, so that a bad folder fails in a second."""
    from refdir.core.runtime import Runtime
    from refdir.method.directions import load_direction

    data = run_prompts(run)
    load_direction(run.path)  # validate before loading the model
    spec, fmt = run_model_and_format(a, run)
    rt = Runtime.load(spec, fmt, **load_options(a))
    direction = load_direction(run.path, expect_d_model=rt.adapter.d_model, expect_model=rt.spec)
    return data, rt, direction


def rate(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def print_summary(s: dict) -> None:
    """The run's summary.json as a table on stdout (``refdir run``, ``refdir judge``)."""
    print(
        f"model {s['model']}: direction at layer {s['layer']}, position {s['pos']} (norm {s['norm']}, "
        f"selection KL {s['kl_selection']})"
    )
    print(f"{'split':9} {'condition':10} {'refusal':>8}")
    for split in ("harmful", "harmless"):
        for c, v in s[f"{split}_refusal"].items():
            print(f"{split:9} {c:10} {v:8.3f}")
    text = s.get("ce_harmless_text") or {}
    print(f"{'condition':10} {'CE(own)':>8} {'CE(text)':>8} {'KL(first)':>10}")
    for c, v in s["ce_harmless"].items():
        t = text.get(c)
        print(f"{c:10} {v:8.4f} {'-' if t is None else f'{t:.4f}':>8} {s['kl_harmless_first'][c]:10.4f}")
    print(f"orthogonalized vs ablation: max |dlogit| = {s['ortho_max_logit_diff']:.2e}")
    if s.get("judge_refusal"):
        print(
            "second judge, refusal rate: " + ", ".join(f"{k} {v:.3f}" for k, v in s["judge_refusal"].items())
        )
    for name, conds in (s.get("overrefusal") or {}).items():  # XSTest
        print(
            f"{name} refusal: "
            + ", ".join(f"{c} {v['substring']:.3f} (n={v['n']})" for c, v in conds.items())
        )
    from refdir.evaluation.capabilities import changed_items  # torch-free

    for task, c in (s.get("capabilities") or {}).items():
        lo, hi = c["delta_ci95"]
        print(
            f"capability {task:16} n={c['n']:<5} baseline {100 * c['baseline']:5.1f}  orthogonalized "
            f"{100 * c['orthogonalized']:5.1f}  delta {100 * c['delta']:+.1f} "
            f"[{100 * lo:+.1f}, {100 * hi:+.1f}]" + (f" ({changed_items(c)})" if changed_items(c) else "")
        )
