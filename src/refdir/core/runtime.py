"""One runtime object through every stage: model, tokenizer, adapter, prompt format, placement, dtype and
batch policy, with one path from text to tensors on the model's input device (:meth:`Runtime.encode`).

Batch sizes are a policy, not constants: on the CPU the defaults below are settings measured on the
machine refdir was built on (a decode step's matmuls run ~3x faster per row at 200 rows than at 12 on
2 cores; flags override them); on accelerators :func:`autotune` grows the generation and forward batches
until out-of-memory or until throughput stops rising, and caches the result per model, device and dtype.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from refdir.core.adapter import ModelAdapter, get_adapter
from refdir.core.templates import Batch, PromptFormat, tokenize_prompts
from refdir.core.types import Model, Tokenizer
from refdir.run.settings import BatchPolicy


@dataclass
class Runtime:
    """What every stage needs to run the model; build it with :meth:`load` or from a loaded model."""

    model: Model
    tokenizer: Tokenizer
    fmt: PromptFormat = field(default_factory=PromptFormat)
    batch: BatchPolicy = field(default_factory=BatchPolicy)

    @property
    def adapter(self) -> ModelAdapter:
        """The model's layer map (built once and cached on the model)."""
        return get_adapter(self.model)

    @property
    def device(self) -> torch.device:
        """The input device (the first device of a device map)."""
        return self.adapter.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (the embedding's)."""
        return self.adapter.dtype

    @property
    def spec(self) -> str | None:
        """The name or folder the model was loaded from; None for a model built in memory."""
        return getattr(self.model, "refdir_spec", None)

    @property
    def load_info(self) -> dict[str, Any]:
        """How the model was loaded (device, device map, dtype, revision, quantization), for run metadata."""
        return getattr(
            self.model,
            "refdir_load",
            {"device": str(self.device), "dtype": str(self.dtype).replace("torch.", "")},
        )

    def encode(self, instructions: list[str]) -> Batch:
        """Chat-format, tokenize and left-pad instructions onto the model's input device."""
        return tokenize_prompts(self.tokenizer, instructions, self.fmt, self.device)

    def with_format(self, fmt: PromptFormat) -> Runtime:
        """The same model under another prompt format (a copy: stages never change a shared runtime)."""
        return replace(self, fmt=fmt)

    @classmethod
    def load(
        cls,
        spec: str,
        fmt: PromptFormat = PromptFormat(),
        batch: BatchPolicy | None = None,
        tune: bool = True,
        **load_options: Any,
    ) -> Runtime:
        """Load a model (:func:`refdir.core.models.load_model` options) and settle its batch policy."""
        from refdir.core.models import load_model

        model, tok = load_model(spec, **load_options)
        rt = cls(model, tok, fmt, batch or BatchPolicy())
        if tune and batch is None:
            rt.batch = autotune(rt)
        return rt


def _cache_file() -> Path:
    """Where tuned batch policies persist across runs, beside the model cache."""
    from refdir.core.models import cache_dir

    return cache_dir() / "batch_policy.json"


def _policy_key(rt: Runtime) -> str:
    """What a tuned policy depends on: the model, the device's name, dtype, quantization, device map."""
    dev = rt.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    info = rt.load_info
    return "|".join(
        map(str, (rt.spec, name, info.get("dtype"), info.get("quantization"), info.get("device_map")))
    )


def autotune(rt: Runtime, max_rows: int = 1024, cache: bool = True) -> BatchPolicy:
    """The batch policy for this model on this device: CPU defaults on the CPU; on accelerators the batch
    doubles from 16 while it fits and gets >= 5% faster (greedy decoding and prompt passes measured apart)."""
    if rt.device.type == "cpu":
        return BatchPolicy()
    key = _policy_key(rt)
    f = _cache_file()
    try:
        known = json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, ValueError):
        known = {}
    if cache and key in known:
        return BatchPolicy(**{**known[key], "source": "cached"})
    gen = _grow(lambda n: _decode_rate(rt, n), max_rows)
    fwd = _grow(lambda n: _forward_rate(rt, n), max_rows)
    policy = BatchPolicy(prompt_rows=fwd, gen_rows=gen, select_rows=fwd, source="autotuned")
    if cache:
        from refdir.core.io import write_json

        known[key] = policy.to_json()
        try:
            write_json(f, known)
        except OSError:
            pass  # a read-only cache only costs the next run the measurement
    return policy


def _grow(rate: Callable[[int], float], max_rows: int) -> int:
    """The batch size (powers of two from 16) after which throughput stops rising by >= 5% or memory runs
    out."""
    best_n, best = 16, 0.0
    n = 16
    while n <= max_rows:
        try:
            r = rate(n)
        except torch.OutOfMemoryError:
            break
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if r < best * 1.05:
            break
        best_n, best = n, r
        n *= 2
    return best_n


def _probe_prompts(n: int) -> list[str]:
    """``n`` built-in harmless prompts (repeated as needed): realistic lengths for the measurement."""
    from refdir.method.data import load_builtin

    pool = [p.instruction for p in load_builtin("harmless")]
    return (pool * (n // len(pool) + 1))[:n]


def _sync(dev: torch.device) -> None:
    """Wait for queued CUDA work, so wall-clock times measure the work itself."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@torch.no_grad()
def _decode_rate(rt: Runtime, n: int, steps: int = 8) -> float:
    """Generated tokens per second for a batch of ``n`` prompts."""
    from refdir.core.forward import greedy_generate
    from refdir.core.prefix import split_prefix

    pb = split_prefix(rt.encode(_probe_prompts(n)), True, rt.model, extra=steps)
    _sync(rt.device)
    t = time.perf_counter()
    new, _ = greedy_generate(rt.model, pb, steps, [-1])  # no end token: every row decodes every step
    _sync(rt.device)
    return sum(map(len, new)) / (time.perf_counter() - t)


@torch.no_grad()
def _forward_rate(rt: Runtime, n: int) -> float:
    """Prompt tokens per second of one prompt pass over ``n`` prompts."""
    from refdir.core.prefix import last_logits_shared, split_prefix

    b = rt.encode(_probe_prompts(n))
    pb = split_prefix(b, True, rt.model)
    _sync(rt.device)
    t = time.perf_counter()
    last_logits_shared(rt.model, pb, max_rows=n)
    _sync(rt.device)
    return float(b.attention_mask.sum()) / (time.perf_counter() - t)
