"""Export an orthogonalized model as an ordinary Hugging Face checkpoint (no refdir needed to load).

Two paths give the same tensors (tests: bit for bit):

* :func:`export_orthogonalized` edits a loaded model in place and saves it (``save_pretrained``);
* :func:`export_streaming` never loads the weights: it reads the source safetensors one tensor at a time,
  projects r̂ out of the residual writers in float64 blocks, writes each tensor in the source dtype and
  frees it. Peak memory is about the largest tensor (the embedding), not the model, so a 70B model exports
  on a machine with less RAM than the model, and a quantized run exports from its full-precision source.

Which tensors are writers comes from the adapter of the model built with its weights on disk (accelerate
offload; one layer of every kind materialized for the numeric check), mapped to checkpoint names: the same
name, or the per-expert tensors ``…experts.{e}.<down>.weight`` that transformers fuses into
``…experts.down_proj`` ``[E, d, ff]`` on loading. A writer no checkpoint tensor maps to is an error.

Tensors are read with plain file reads, not memory maps, and written by a minimal safetensors writer
(header first, then each tensor's bytes): a memory-mapped 2 GB file would count its touched pages as
resident memory, and ``safetensors.torch.save_file`` builds a shard's bytes in memory.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from refdir import __version__
from refdir.core.adapter import get_adapter
from refdir.core.errors import RefdirError
from refdir.core.io import atomic_dir
from refdir.core.types import Model, Tokenizer
from refdir.core.writers import project_out_axis_
from refdir.method.directions import load_direction
from refdir.method.interventions import orthogonalize_weights, unit_vector

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}


def _vectors(direction, direction_src, rank: int, d_model: int) -> list[torch.Tensor]:
    """What to project out: the direction, or the first ``rank`` vectors of the run's refusal cone
    (orthonormal: projecting them out one after the other is projecting out their span)."""
    if rank == 1:
        return [direction.vector]
    from refdir.method.directions import load_subspace

    return list(load_subspace(direction_src, rank, d_model))


def _meta(model: Model, ad, direction, direction_src) -> dict:
    return {
        "refdir": __version__,
        "source": str(direction_src),
        "source_model": getattr(model, "refdir_spec", None),
        "layer": direction.layer,
        "pos": direction.pos,
        "direction_norm": float(direction.vector.norm()),
        "exact": ad.linear_writes,
        "method": "weight orthogonalization (Arditi et al. 2024, Eq. 5)",
    }


def export_orthogonalized(
    model: Model,
    tokenizer: Tokenizer,
    direction_src: str | Path,
    out: str | Path,
    allow_approximate: bool = False,
    max_shard_size: str = "2GB",
    rank: int = 1,
) -> Path:
    """Orthogonalize ``model`` in place and save it (safetensors, sharded) with its tokenizer.

    Written to a temporary folder beside ``out`` and renamed at the end, so an interrupted or
    failed export (disk full) leaves nothing behind.
    """
    ad = get_adapter(model)
    direction = load_direction(
        direction_src, expect_d_model=ad.d_model, expect_model=getattr(model, "refdir_spec", None)
    )
    for v in _vectors(direction, direction_src, rank, ad.d_model):
        orthogonalize_weights(model, v, allow_approximate)
    out = Path(out)
    try:
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
            tokenizer.save_pretrained(tmp)
            (tmp / "refdir.json").write_text(
                json.dumps(_meta(model, ad, direction, direction_src), indent=1) + "\n"
            )
    except OSError as e:
        raise RefdirError(f"export to {out} failed: {e.strerror or e}; nothing was written") from None
    return out


# ---- safetensors without memory maps -------------------------------------------------------------


@dataclass
class _Entry:
    file: Path
    name: str
    dtype: str
    shape: list[int]
    start: int  # absolute byte offset in the file
    nbytes: int


def _read_header(path: Path) -> list[_Entry]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return [
        _Entry(
            path,
            k,
            v["dtype"],
            v["shape"],
            8 + n + v["data_offsets"][0],
            v["data_offsets"][1] - v["data_offsets"][0],
        )
        for k, v in header.items()
    ]


def _read_tensor(e: _Entry) -> torch.Tensor:
    if e.dtype not in DTYPES:
        raise RefdirError(f"{e.file.name}: tensor {e.name} has dtype {e.dtype}, which refdir cannot edit")
    buf = bytearray(e.nbytes)
    with open(e.file, "rb") as f:
        f.seek(e.start)
        f.readinto(buf)
    t = torch.frombuffer(buf, dtype=DTYPES[e.dtype]) if e.nbytes else torch.empty(0, dtype=DTYPES[e.dtype])
    return t.reshape(e.shape)


class _ShardWriter:
    """Writes one safetensors file whose tensor names, dtypes and shapes are known in advance."""

    def __init__(self, path: Path, specs: list[tuple[str, str, list[int], int]]):
        header, off = {}, 0
        for name, dtype, shape, nbytes in specs:
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + nbytes]}
            off += nbytes
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)
        self.order = [s[0] for s in specs]
        self.i = 0

    def write(self, name: str, t: torch.Tensor) -> None:
        if self.order[self.i] != name:
            raise RuntimeError(f"shard writer expected {self.order[self.i]}, got {name}")
        self.i += 1
        if t.numel():
            self.f.write(t.contiguous().view(torch.uint8).numpy().data)

    def close(self) -> None:
        self.f.close()


# ---- which checkpoint tensors are residual writers ------------------------------------------------


def _source_folder(spec: str, revision: str | None) -> Path:
    from refdir.core.models import resolve_model_path

    path = resolve_model_path(spec)
    p = Path(path)
    if p.is_dir():
        return p
    try:  # a hub id: the snapshot's safetensors (needs the network once)
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                path,
                revision=revision,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
            )
        )
    except Exception as e:
        raise RefdirError(
            f"cannot fetch the full-precision source of '{spec}': {type(e).__name__}: {str(e)[:200]}"
        ) from e


def _source_entries(src: Path) -> list[_Entry]:
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise RefdirError(
            f"{src} has no .safetensors weights: streaming export needs the full-precision source "
            "in safetensors (export a loaded model with --in-memory instead)"
        )
    return [e for f in files for e in _read_header(f)]


def writer_plan(ad, names: list[str], sources: dict | None = None) -> dict[str, int]:
    """Checkpoint tensor name -> the axis of size d_model to project r̂ out of (embeddings, every writer).

    In-memory names map to themselves; a fused expert writer ``P.experts.X`` ``[E, ., .]`` maps to the
    checkpoint's ``Q.experts.{e}.L.weight`` of the same layer (transformers renames ``block_sparse_moe`` to
    ``mlp`` and ``w2`` to ``down_proj`` on loading), each ``[., .]`` with the expert axis gone.
    ``sources``, if given, receives checkpoint name -> (in-memory writer or None for embeddings, expert
    index or None): what a per-writer edit (a search trial) needs to know of each tensor."""
    sources = {} if sources is None else sources
    have = set(names)
    plan: dict[str, int] = {}
    embed = ad.embed_name
    plan[embed] = 1
    sources[embed] = (None, None)
    if ad.pos_embed is not None:
        plan[ad.pos_embed_name] = 1
        sources[ad.pos_embed_name] = (None, None)
    per_expert: dict[tuple[str, str, str], list[str]] = {}  # (layer, leaf, weight|bias) -> names
    for n in names:
        m = re.match(r"(.*\.layers\.(\d+)\.).*\.experts\.(\d+)\.([A-Za-z0-9_]+)\.(weight|bias)$", n)
        if m:
            per_expert.setdefault((m.group(2), m.group(4), m.group(5)), []).append(n)
    unmapped = []
    for w in ad.all_writers():
        if w.name in have:
            plan[w.name] = w.axis
            sources[w.name] = (w, None)
            continue
        lm = re.search(r"\.layers\.(\d+)\.", w.name)
        t = w.tensor
        if t.dim() in (2, 3) and lm is not None and ".experts." in w.name:
            kind = "bias" if w.attr.endswith("bias") else "weight"
            cands = [
                v
                for (layer, leaf, k), v in per_expert.items()
                if layer == lm.group(1)
                and k == kind
                and any(word in leaf for word in ("down", "w2", "wo", "output"))
            ]
            if len(cands) == 1 and len(cands[0]) == t.shape[0]:
                for n in cands[0]:
                    plan[n] = w.axis - 1  # the expert axis is split into tensors
                    sources[n] = (w, int(re.findall(r"\.experts\.(\d+)\.", n)[-1]))
                continue
        unmapped.append(w.name)
    if unmapped:
        raise RefdirError(
            f"cannot find the checkpoint tensors of {len(unmapped)} residual writer(s), e.g. {unmapped[0]}; "
            "this checkpoint's layout is converted on loading in a way refdir does not map: export the "
            "loaded model with --in-memory"
        )
    return plan


def _plan_model(src: Path, trust_remote_code: bool, offload: Path):
    """The model with its weights on disk (accelerate) except one layer of every kind (for the numeric
    check)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from refdir.core.adapter import find_layers, layer_kind
    from refdir.core.models import load_model

    config = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = find_layers(skeleton, int(getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "n_layer", 0)))
    names = {m: n for n, m in skeleton.named_modules()}
    inside = {id(m) for layer in layers for m in layer.modules()}
    seen, device_map = set(), {}
    for n, m in skeleton.named_modules():  # everything outside the layers: on disk if it has weights
        if id(m) in inside:
            continue
        if any(True for _ in m.parameters(recurse=False)):
            device_map[n] = "disk"
        elif any(True for _ in m.buffers(recurse=False)):
            device_map[n] = "cpu"
    for layer in layers:
        kind = layer_kind(layer)
        device_map[names[layer]] = "disk" if kind in seen else "cpu"
        seen.add(kind)
    dtype = next((p.dtype for p in skeleton.parameters() if p.is_floating_point()), torch.float32)
    from refdir.core.models import checkpoint_dtype

    dtype = checkpoint_dtype(config) or dtype
    model, _ = load_model(
        str(src),
        dtype=dtype,
        device_map=device_map,
        trust_remote_code=trust_remote_code,
        offload_folder=str(offload),
    )
    return model


# (model, adapter, checkpoint name -> (writer, expert)) -> (per-tensor edit, refdir.json): a search trial
EditPlan = Callable[[Model, Any, dict], tuple[Callable[[str, torch.Tensor, Callable], torch.Tensor], dict]]


@dataclass
class _StreamPlan:
    """What the streamed export edits, learnt from the model built with its weights on disk."""

    units: list[torch.Tensor]  # [d] unit vectors to project out, in order
    writers: dict[str, int]  # checkpoint tensor name -> its d_model axis
    tied: bool  # the source ties its embeddings: the output gets an untied unembedding
    embed: str  # checkpoint names of the embedding and the unembedding
    head: str
    meta: dict  # refdir.json
    # a per-tensor edit (name, tensor, read(other name)) -> tensor, instead of projecting out ``units``
    transform: Callable[[str, torch.Tensor, Callable[[str], torch.Tensor]], torch.Tensor] | None = None


def _stream_plan(
    src: Path,
    spec: str,
    direction_src: str | Path,
    entries: list[_Entry],
    offload: Path,
    allow_approximate: bool,
    trust_remote_code: bool,
    rank: int,
    edit_plan: EditPlan | None = None,
) -> _StreamPlan:
    """Build the model offloaded to ``offload`` (removed after), check it can be orthogonalized, and map
    its residual writers and the direction (or ``edit_plan``'s per-tensor edit) onto the checkpoint's
    tensors."""
    try:
        model = _plan_model(src, trust_remote_code, offload)
        ad = get_adapter(model)
        if not ad.linear_writes and not allow_approximate:
            raise RefdirError(
                f"{type(model).__name__} normalizes attention/MLP outputs before adding them to the residual "
                "stream, so weight orthogonalization cannot equal ablation; pass --allow-approximate to "
                "edit the projections anyway"
            )
        if edit_plan is not None:
            sources: dict = {}
            writers = writer_plan(ad, [e.name for e in entries], sources)
            transform, meta = edit_plan(model, ad, sources)
            plan = _StreamPlan([], writers, ad.tied, ad.embed_name, ad.unembed_name, meta, transform)
            del model, ad
            return plan
        direction = load_direction(direction_src, expect_d_model=ad.d_model, expect_model=spec)
        units = [
            unit_vector(v, ad.d_model) for v in _vectors(direction, direction_src, rank, ad.d_model)
        ]  # as in memory
        plan = _StreamPlan(
            units,
            writer_plan(ad, [e.name for e in entries]),
            ad.tied,
            ad.embed_name,
            ad.unembed_name,
            _meta(model, ad, direction, direction_src),
        )
        del model, ad
    finally:
        shutil.rmtree(offload, ignore_errors=True)
    return plan


def _shards(
    entries: list[_Entry], plan: _StreamPlan, max_shard_bytes: int
) -> tuple[list[tuple[_Entry, str]], list[list[tuple[_Entry, str]]]]:
    """The output tensors (source entry, output name): the source's, plus the untied unembedding right
    after the embedding; and those cut into shards of at most ``max_shard_bytes`` (a larger tensor alone)."""
    specs: list[tuple[_Entry, str]] = []
    for e in entries:
        specs.append((e, e.name))
        if plan.tied and e.name == plan.embed and plan.head not in {x.name for x in entries}:
            specs.append((e, plan.head))
    shards: list[list[tuple[_Entry, str]]] = []
    cur: list[tuple[_Entry, str]] = []
    size = 0
    for e, name in specs:
        if cur and size + e.nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((e, name))
        size += e.nbytes
    if cur:
        shards.append(cur)
    return specs, shards


def _write_shard(
    path: Path, shard: list[tuple[_Entry, str]], plan: _StreamPlan, read: Callable[[str], torch.Tensor]
) -> None:
    """One output shard, tensor by tensor: read, r̂ projected out of the writers, written, freed. The
    embedding read once serves the untied unembedding after it (kept unedited: it reads r̂)."""
    w = _ShardWriter(path, [(n, e.dtype, e.shape, e.nbytes) for e, n in shard])
    cached: tuple[str, torch.Tensor] | None = None
    for e, name in shard:
        t = cached[1] if cached is not None and cached[0] == e.name else _read_tensor(e)
        cached = (e.name, t) if plan.tied and e.name == plan.embed and name == plan.embed else None
        if name in plan.writers and name != plan.head:
            t = t.clone() if cached is not None else t
            if plan.transform is not None:
                t = plan.transform(name, t, read)
            for unit in plan.units:
                project_out_axis_(t, unit, plan.writers[name])
        w.write(name, t)
        del t
    w.close()


def export_streaming(
    spec: str,
    tokenizer_src: str | None,
    direction_src: str | Path,
    out: str | Path,
    allow_approximate: bool = False,
    revision: str | None = None,
    trust_remote_code: bool = False,
    max_shard_bytes: int = 2 << 30,
    log=lambda m: None,
    rank: int = 1,
    edit_plan: EditPlan | None = None,
) -> Path:
    """Orthogonalize the checkpoint ``spec`` tensor by tensor into ``out`` (see the module docstring).

    Output shards hold at most ``max_shard_bytes`` (one larger tensor gets a shard of its own); every
    non-weight file of the source (config, tokenizer, generation config) is copied, the config untied when
    the source ties its embeddings (the unembedding keeps reading r̂). Atomic: all or nothing.
    """
    from refdir.core.models import release_memory

    src = _source_folder(spec, revision)
    entries = _source_entries(src)
    out = Path(out)
    offload = out.parent / f".{out.name}.offload"
    plan = _stream_plan(
        src, spec, direction_src, entries, offload, allow_approximate, trust_remote_code, rank, edit_plan
    )
    by_name = {e.name: e for e in entries}
    release_memory()
    missing = sorted(set(plan.writers) - {e.name for e in entries})
    if missing:
        raise RefdirError(f"the checkpoint has no tensor {missing[0]}; is {src} complete?")
    specs, shards = _shards(entries, plan, max_shard_bytes)
    try:
        with atomic_dir(out) as tmp:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                log(f"export: shard {i + 1}/{len(shards)}")
                _write_shard(tmp / fname, shard, plan, lambda n: _read_tensor(by_name[n]))
                weight_map.update({n: fname for _, n in shard})
            total = sum(e.nbytes for e, _ in specs)
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1) + "\n"
            )
            _copy_side_files(src, tmp, plan.tied)
            if tokenizer_src is not None and not (tmp / "tokenizer_config.json").exists():
                _copy_side_files(Path(tokenizer_src), tmp, plan.tied, only_tokenizer=True)
            (tmp / "refdir.json").write_text(json.dumps({**plan.meta, "streamed": True}, indent=1) + "\n")
    except OSError as e:
        raise RefdirError(f"export to {out} failed: {e.strerror or e}; nothing was written") from None
    return out


def _copy_side_files(src: Path, dst: Path, untie: bool, only_tokenizer: bool = False) -> None:
    for f in sorted(src.iterdir()):
        if (
            not f.is_file()
            or f.suffix == ".safetensors"
            or f.name in ("model.safetensors.index.json", "refdir.json")
        ):
            continue
        if only_tokenizer and "token" not in f.name and not f.name.endswith((".model", ".jinja")):
            continue
        if f.name == "config.json":
            cfg = json.loads(f.read_text())
            if untie:
                cfg["tie_word_embeddings"] = False
                if isinstance(cfg.get("text_config"), dict):
                    cfg["text_config"]["tie_word_embeddings"] = False
            (dst / f.name).write_text(json.dumps(cfg, indent=2) + "\n")
        else:
            shutil.copyfile(f, dst / f.name)
