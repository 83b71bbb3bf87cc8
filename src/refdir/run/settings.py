"""The run's settings: one schema for the CLI flags, the presets, :class:`RunConfig` and a TOML file.

Every setting is a field of :class:`RunConfig` (or of its :class:`SelectionConfig`) whose metadata says
its flag, help and how a text value is read; :func:`add_arguments` builds the flags from it and
:func:`resolve` builds the configuration. Precedence, lowest first: the defaults here, the preset (a
flag, or ``preset = "quick"`` in the file), the TOML file (``--config run.toml``), the flags given on the
command line. The run folder's ``config.json`` records the resolved result.

Torch-free on purpose: ``refdir --help`` builds its flags from this module without importing torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from pathlib import Path
from types import ModuleType
from typing import Any

from refdir.core.errors import RefdirError
from refdir.core.prompt_format import PromptFormat, canonical_json_object

DEFAULT_MODEL = "qwen2.5-coder-1.5b-instruct"

PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized defaults (documented in the README): the paper's sizes, 64 new tokens.
    "default": {},
    "quick": {"n_train": 32, "n_val": 8, "n_eval": 16, "max_new_tokens": 24, "overrefusal_n": 10},
    "paper": {"max_new_tokens": 512, "regenerate_ortho": True},
}


def _s(
    default: Any,
    help: str = "",
    flag: str | None = None,
    group: str = "run",
    read: str | None = None,
    **arg: Any,
) -> Any:
    """A setting: ``flag`` (None: no flag, TOML only), its argparse keywords (``type``/``choices`` also check
    a TOML-only setting's value), and ``read`` (how a text is read)."""
    kw = {"default_factory": default} if callable(default) else {"default": default}
    return field(**kw, metadata={"help": help, "flag": flag, "group": group, "read": read, "arg": arg})


def positive_int(v: str) -> int:
    """argparse ``type=`` of every size: an integer above zero (one message for a flag and a TOML value)."""
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{v}'") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {n}")
    return n


def nonnegative_int(v: str) -> int:
    """argparse ``type=`` of a count where 0 turns something off (``--overrefusal-n 0``)."""
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got '{v}'") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {n}")
    return n


@dataclass
class SelectionConfig:
    """Selection settings (paper §2.3). ``SelectionConfig()`` keeps the paper's induce threshold 0.0; a run's
    settings (``RunConfig``: the CLI, ``find_direction``) use None instead, the model's own refusal
    threshold calibrated by the prompt screen, because weak models refuse with P(refusal token) < 0.5."""

    max_layer_frac: float = _s(0.8, "discard candidates from layers >= int(frac * L)", type=float)
    kl_threshold: float = _s(
        0.1,
        "discard candidates whose ablation moves harmless next-token KL above this",
        "--kl-threshold",
        type=float,
    )
    induce_threshold: float | None = _s(
        0.0,
        "induce filter (default: the model's calibrated refusal log-odds; the paper uses 0)",
        "--induce-threshold",
        type=float,
    )
    batch_rows: int = _s(64, "rows (candidate x prompt) per forward pass", type=positive_int)
    prune: bool = _s(True, "score every eligible candidate fully", "--no-prune", action="store_false")
    chunk: int = _s(8, "candidates given a full bypass score per round, in screen order", type=positive_int)
    exhaustive: bool = _s(
        False, "score all candidates, late layers too (full heatmaps)", "--exhaustive", action="store_true"
    )
    selector: str = _s(
        "paper",
        "paper: bypass/induce/KL on refusal-token log-odds; cosmic: cosine similarity of "
        "intervened activations (Siu et al. 2025), no refusal tokens",
        "--selector",
        choices=["paper", "cosmic"],
    )

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class BatchPolicy:
    """Rows per forward pass for each kind of work (``source``: defaults | user | autotuned | cached)."""

    prompt_rows: int = 32  # prompt passes: extraction, KL/CE, judges
    gen_rows: int = 200  # greedy generation rows (the evaluation conditions share batches)
    select_rows: int = 64  # selection rows: candidate x prompt
    source: str = "defaults"

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class RunConfig:
    # the model and its prompt format
    model: str = _s(DEFAULT_MODEL, "offline alias, hub id, local folder or .gguf file", "--model", "model")
    system: str | None = _s(
        None, "system prompt (default: the template's own; '' for an empty one)", "--system", "model"
    )
    chat_template: str | None = _s(
        None,
        "Jinja chat template FILE for a tokenizer without one (e.g. a base model)",
        "--chat-template",
        "model",
        read="file",
        metavar="FILE",
    )
    template_kwargs: str | None = _s(
        None,
        "extra chat-template variables, e.g. '{\"enable_thinking\": false}' "
        '(Qwen3) or \'{"date_string": "26 Jul 2024"}\' (Llama-3.x prints today\'s '
        "date otherwise)",
        "--template-kwargs",
        "model",
        read="json",
        metavar="JSON",
    )
    # where and how the weights are loaded
    dtype: str = _s(
        "auto",
        "auto: float32 on the CPU, the checkpoint's dtype on accelerators (bf16 for fp32 checkpoints)",
        "--dtype",
        "load",
        choices=["auto", "float32", "bfloat16", "float16"],
    )
    device: str = _s("auto", "auto | cpu | cuda | cuda:N | mps", "--device", "load")
    device_map: str | None = _s(
        None,
        "spread the model over several devices / offload to CPU and disk (accelerate)",
        "--device-map",
        "load",
        metavar="auto|balanced|FILE.json",
    )
    max_memory: str | None = _s(
        None, "per-device caps for --device-map", "--max-memory", "load", metavar="0=20GiB,cpu=64GiB"
    )
    revision: str | None = _s(
        None, "hub revision (branch, tag or commit) of a hub model", "--revision", "load"
    )
    load_in_4bit: bool = _s(
        False,
        "bitsandbytes 4-bit weights (hooks only; export re-reads the full-precision source)",
        "--load-in-4bit",
        "load",
        action="store_true",
    )
    load_in_8bit: bool = _s(
        False, "bitsandbytes 8-bit weights (likewise)", "--load-in-8bit", "load", action="store_true"
    )
    trust_remote_code: bool = _s(
        False,
        "allow code shipped with the model (off by default)",
        "--trust-remote-code",
        "load",
        action="store_true",
    )
    # data and sizes
    harmful: str = _s(
        "builtin:harmful",
        "harmful instructions: builtin:harmful or a .json/.jsonl/.csv/.txt file",
        "--harmful",
    )
    harmless: str = _s("builtin:harmless", "harmless instructions (likewise)", "--harmless")
    eval_harmful: str | None = _s(
        None, "harmful evaluation prompts (default: held out from --harmful)", "--eval-harmful"
    )
    eval_harmless: str | None = _s(
        None, "harmless evaluation prompts (default: held out from --harmless)", "--eval-harmless"
    )
    ce_text: str | None = _s(
        "builtin:harmless_pairs",
        "instruction+response pairs for the CE check ('none' to skip)",
        "--ce-text",
        read="none",
    )
    prompt_field: str = _s("instruction", "JSON key / CSV column holding the instruction", "--field")
    n_train: int = _s(128, "training prompts per side", "--n-train", type=positive_int)
    n_val: int = _s(32, "validation prompts per side (selection)", "--n-val", type=positive_int)
    n_eval: int = _s(100, "evaluation prompts per side", "--n-eval", type=positive_int)
    seed: int = _s(42, "seed of the splits", "--seed", type=int)
    filter: str = _s(
        "auto", "which prompts the screen keeps", "--filter", choices=["auto", "metric", "generation", "none"]
    )
    refusal_tokens: list[str] | None = _s(
        None, "override the derived refusal tokens", "--refusal-tokens", nargs="+"
    )
    min_refusal_rate: float = _s(
        0.1,
        "stop when the model refuses fewer harmful prompts than this (no direction to find)",
        "--min-refusal-rate",
        type=float,
    )
    max_new_tokens: int = _s(
        64, "greedy tokens per completion (--preset paper: 512)", "--max-new-tokens", type=positive_int
    )
    regenerate_ortho: bool = _s(
        False,
        "regenerate under orthogonalized weights instead of checking them against ablation on logits",
    )
    judge: str | None = _s(
        "auto",
        "second judge: 'auto' (the probe judge when it can run here, else none), 'probe' / "
        "'probe:PATH' (a linear probe on a small judge model), 'self' (the model says whether each "
        "reply is a refusal), 'self+evasive', 'none' or a safety classifier hub id/folder",
        "--judge",
        read="none",
    )
    judge_model: str | None = _s(
        None, "the model an OpenAI-compatible --judge endpoint (http://HOST/v1) serves", "--judge-model"
    )
    overrefusal_n: int = _s(
        50,
        "XSTest prompts per set (safe, unsafe contrast) generated under each condition to measure "
        "over-refusal, stratified over XSTest's types in a fixed order (--preset quick: 10); 0: off",
        "--overrefusal-n",
        type=nonnegative_int,
    )
    # capability benchmarks (lm-evaluation-harness): baseline vs orthogonalized on the same items
    capabilities: str | None = _s(
        None,
        "capability benchmarks after the evaluation: harness task names "
        "(mmlu,arc_challenge,...) or 'paper' (the paper's six); needs "
        "refdir[capabilities]",
        "--capabilities",
        metavar="TASKS",
    )
    capabilities_data_dir: str | None = _s(
        None,
        "local copies of the paper's benchmarks (the layout of shared/benchmarks/) instead of the hub",
        "--capabilities-data-dir",
        metavar="DIR",
    )
    capabilities_limit: int | None = _s(
        None, "items per task (MMLU: spread over its subjects)", "--capabilities-limit", type=positive_int
    )
    capabilities_fewshot: int | None = _s(
        None, "few-shot examples (default: each task's own)", "--capabilities-fewshot", type=int
    )
    capabilities_max_gen_toks: int | None = _s(
        None,
        "token cap of generative tasks (GSM8K; harness default 256)",
        "--capabilities-max-gen-toks",
        type=positive_int,
    )
    # batch sizes: None lets the runtime decide (CPU defaults, autotuned on accelerators)
    batch_size: int | None = _s(
        None,
        "prompts per forward pass (default: 32 on the CPU, autotuned on accelerators)",
        "--batch-size",
        type=positive_int,
    )
    gen_batch_size: int | None = _s(
        None,
        "rows per generation batch (default: 200 on the CPU, autotuned on "
        "accelerators; the KV cache grows with it)",
        "--gen-batch-size",
        type=positive_int,
    )
    selection: SelectionConfig = field(default_factory=lambda: SelectionConfig(induce_threshold=None))

    def to_json(self) -> dict:
        d = asdict(self)
        d["selection"] = self.selection.to_json()
        return d

    @property
    def fmt(self):
        return PromptFormat(
            system=self.system, chat_template=self.chat_template, template_kwargs=self.template_kwargs
        )

    def batch_policy(self) -> BatchPolicy | None:
        """The user's batch sizes, or None: the runtime's policy (CPU defaults, autotuned on accelerators)."""
        if self.batch_size is None and self.gen_batch_size is None:
            return None
        d = BatchPolicy()
        return BatchPolicy(
            prompt_rows=self.batch_size or d.prompt_rows,
            gen_rows=self.gen_batch_size or d.gen_rows,
            select_rows=self.selection.batch_rows,
            source="user",
        )

    def load_options(self) -> dict:
        """Keyword arguments of :func:`refdir.core.models.load_model`."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("group") == "load"}


def _settings(groups: tuple[str, ...]) -> Iterator[tuple[str, Field]]:
    """(owner, field) of every setting with a flag in ``groups`` (``selection`` names SelectionConfig's)."""
    for f in fields(RunConfig):
        if f.metadata.get("flag") and f.metadata["group"] in groups:
            yield "run", f
    if "selection" in groups:
        for f in fields(SelectionConfig):
            if f.metadata.get("flag"):
                yield "selection", f


def add_arguments(
    p: argparse.ArgumentParser,
    groups: tuple[str, ...],
    suppress: bool = True,
    model_default: str | None = DEFAULT_MODEL,
) -> None:
    """The flags of the settings in ``groups``. ``suppress``: a flag not given leaves no attribute, so
    :func:`resolve` can tell given flags from defaults; otherwise the defaults are set."""
    for owner, f in _settings(groups):
        m = f.metadata
        kw = dict(m["arg"], help=m["help"])
        if suppress:
            kw["default"] = argparse.SUPPRESS
        elif f.name == "model":
            kw["default"] = model_default
        elif kw.get("action") not in ("store_true", "store_false"):
            kw["default"] = f.default if f.default is not MISSING else None
        p.add_argument(m["flag"], dest=f.name if owner == "run" else f"selection.{f.name}", **kw)


def add_setting(p: argparse.ArgumentParser, name: str, flag: str | None = None, **override: Any) -> None:
    """One setting's flag on a command outside ``run`` (``refdir evaluate --max-new-tokens``): its type,
    choices and help from the schema, so the same value is checked the same way everywhere. ``flag``
    renames it (``--limit`` for ``capabilities_limit``); ``override``: argparse keywords that differ for
    this command (its own default or help). The attribute is named after the flag, as argparse does."""
    f = next(f for f in fields(RunConfig) if f.name == name)
    m = f.metadata
    default = f.default if f.default is not MISSING else None
    kw = {**m["arg"], "help": m["help"], "default": default, **override}
    p.add_argument(flag or m["flag"], **kw)


def read_value(f: Field, value: Any) -> Any:
    """A setting's value as given in a flag or the TOML file, read as its metadata says."""
    how = f.metadata.get("read")
    if value is None:
        return None
    if how == "file":
        try:
            return Path(value).read_text()
        except OSError as e:
            raise RefdirError(f"cannot read --{f.name.replace('_', '-')} {value}: {e.strerror}") from None
    if how == "json":
        return canonical_json_object(value, f"--{f.name.replace('_', '-')}")
    if how == "none":
        return None if value == "none" else value
    return value


def _toml() -> ModuleType:
    """``tomllib`` (Python 3.11+), else the ``tomli`` backport pyproject declares for Python 3.10."""
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    import tomli

    return tomli


def load_toml(path: str) -> dict:
    toml = _toml()
    try:
        with open(path, "rb") as fh:
            return toml.load(fh)
    except OSError as e:
        raise RefdirError(f"cannot read --config {path}: {e.strerror}") from None
    except toml.TOMLDecodeError as e:
        raise RefdirError(f"--config {path} is not valid TOML: {e}") from None


def _converted(f: Field, value: Any, bad: Any) -> Any:
    """One scalar through the flag's ``type=`` and ``choices=``, as argparse checks the flag's text."""
    arg = f.metadata.get("arg", {})
    conv = arg.get("type")
    if conv is None:  # a text setting; a JSON setting may also be a TOML table
        if not isinstance(value, str) and not (f.metadata.get("read") == "json" and isinstance(value, dict)):
            raise bad(f"expected a string, got {value!r}")
        v = value
    else:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise bad(f"expected a number, got {value!r}")
        try:
            v = conv(str(value))
        except argparse.ArgumentTypeError as e:
            raise bad(str(e)) from None
        except ValueError:
            raise bad(f"invalid {getattr(conv, '__name__', 'value')} value: {str(value)!r}") from None
    choices = arg.get("choices")
    if choices is not None and v not in choices:
        raise bad(f"invalid choice: {v!r} (choose from {', '.join(repr(c) for c in choices)})")
    return v


def check_value(f: Field, value: Any, key: str, where: str) -> Any:
    """A settings-file value through the same checks as its flag (type conversion, choices, positive
    sizes; a switch must be true or false, a list a list of strings), then read as the setting says.
    A bad value is one :class:`RefdirError` naming ``key``, before any model loads or folder is made."""

    def bad(msg: str) -> RefdirError:
        return RefdirError(f"{where}: {key}: {msg}")

    arg = f.metadata.get("arg", {})
    if arg.get("action") in ("store_true", "store_false") or isinstance(f.default, bool):
        if not isinstance(value, bool):
            raise bad(f"expected true or false, got {value!r}")
        return value
    if arg.get("nargs"):
        if not isinstance(value, list) or not value:
            raise bad(f"expected a non-empty list, got {value!r}")
        return [_converted(f, v, bad) for v in value]
    return read_value(f, _converted(f, value, bad))


def resolve(given: dict, config_file: str | None = None, preset: str | None = None) -> RunConfig:
    """Defaults < preset < TOML file < ``given`` (flags as parsed: ``selection.X`` keys for selection).
    The file's values pass the flags' checks (:func:`check_value`); ``given`` ones were parsed already."""
    table = load_toml(config_file) if config_file else {}
    preset = preset or table.pop("preset", None) or "default"
    table.pop("preset", None)
    if preset not in PRESETS:
        raise RefdirError(f"unknown preset '{preset}' (use {', '.join(PRESETS)})")
    run_fields = {f.name: f for f in fields(RunConfig) if f.name != "selection"}
    sel_fields = {f.name: f for f in fields(SelectionConfig)}
    sel_table = table.pop("selection", {})
    where = f"--config {config_file}"
    if not isinstance(sel_table, dict):
        raise RefdirError(f"{where}: selection: expected a [selection] table, got {sel_table!r}")
    unknown = [k for k in table if k not in run_fields] + [
        f"selection.{k}" for k in sel_table if k not in sel_fields
    ]
    if unknown:
        raise RefdirError(
            f"{where}: unknown setting '{unknown[0]}' (settings: {', '.join(run_fields)}, "
            f"[selection] {', '.join(sel_fields)})"
        )
    values = {k: check_value(run_fields[k], v, k, where) for k, v in table.items()}
    sel_values = {k: check_value(sel_fields[k], v, f"selection.{k}", where) for k, v in sel_table.items()}
    cfg = RunConfig(**PRESETS[preset])
    for k, v in values.items():
        setattr(cfg, k, v)
    for k, v in sel_values.items():
        setattr(cfg.selection, k, v)
    for k, v in given.items():
        if k.startswith("selection."):
            setattr(cfg.selection, k.split(".", 1)[1], v)
        elif k in run_fields:
            setattr(cfg, k, read_value(run_fields[k], v))
    return cfg
