"""One architecture adapter: where a causal LM keeps its layers and residual-stream writes.

Everything that hooks or edits a model goes through :class:`ModelAdapter`, so no code elsewhere
branches on the model family. The adapter learns the layout by inspecting the module tree and
then *verifies* it numerically: on a short input, the change of the residual stream across a
decoder layer must be a linear combination of the outputs of the two modules it calls the
attention write and the MLP write. That single rule covers pre-norm blocks (Llama, Qwen,
Mistral, Phi-3), scaled residuals (Granite) and sandwich norms (Gemma 2/3, OLMo 2), and it
fails loudly on anything it does not understand instead of silently skipping a write.

Weight orthogonalization edits every *residual writer*: each parameter whose output space is the
residual stream (:class:`ResidualWriter`: the attention output projection, the MLP down projection,
every routed expert's down projection — per-expert ``nn.Linear`` modules or fused 3-D parameters
``[E, d_model, ff]`` / ``[E, ff, d_model]`` — shared experts, and their biases). The set is checked
numerically for each kind of decoder layer (dense and MoE layers of one model differ): with the
writers of one layer edited in place for a random r̂, the attention and MLP blocks must output exactly
P·(their unedited output), P = I - r̂r̂ᵀ, on the same input. A family where that fails (writes through
a post-norm) is marked approximate; nothing is ever edited partially without saying so.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import nn

from refdir.core.errors import RefdirError

# Names under which transformers models keep output projections (a vocabulary, not a family table).
ATTN_OUT_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "wo", "out")
MLP_OUT_NAMES = ("down_proj", "fc2", "c_proj", "dense_4h_to_h", "w2", "fc_out", "wo", "proj_out")
# Fused expert parameters ([E, ., .]) whose name contains one of these write the residual stream.
EXPERT_OUT_WORDS = ("down", "w2", "wo", "output")


def first_tensor(x):
    """Modules return a tensor or a tuple whose first item is the hidden state."""
    return x[0] if isinstance(x, (tuple, list)) else x


def _out_features(m: nn.Module) -> int | None:
    w = getattr(m, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        return None
    if isinstance(m, nn.Linear):
        return m.out_features
    return w.shape[1]  # transformers' Conv1D stores weight as [in, out]


def _is_linear_like(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


@dataclass
class ResidualWriter:
    """A parameter whose output space is the residual stream: r̂ is projected out of its ``axis``."""

    name: str  # full parameter name (state-dict key), e.g. model.layers.3.mlp.experts.down_proj
    module: nn.Module
    attr: str  # the attribute of ``module`` that holds it ("weight", "bias", "down_proj", ...)
    axis: int  # the axis of size d_model: 0 of Linear [d, in], 1 of [E, d, ff], 2 of [E, ff, d]
    ambiguous: bool = False  # a fused [E, d, d] parameter: the layout was settled by the numeric check

    @property
    def tensor(self) -> torch.Tensor:
        return getattr(self.module, self.attr)

    def to_json(self) -> dict:
        return {"name": self.name, "axis": self.axis, "shape": list(self.tensor.shape)}


@dataclass
class ModelAdapter:
    """Handles on the parts of a decoder-only transformer that refdir reads and edits.

    Attributes are plain module references; shapes refer to ``d_model`` (residual width).
    """

    model: nn.Module
    layers: nn.ModuleList
    embed: nn.Embedding
    unembed: nn.Module
    pos_embed: nn.Embedding | None
    attn: list[nn.Module]  # attention module of each layer
    attn_out: list[nn.Module]  # its output projection (split by head for attribution)
    writers: list[list[ResidualWriter]]  # per layer: every parameter writing the residual stream
    attn_write: list[nn.Module]  # the module whose output is added to the residual stream
    mlp_write: list[nn.Module]
    d_model: int
    n_heads: int
    head_dim: int
    linear_writes: bool  # editing the writers equals ablation at every block: orthogonalization is exact
    tied: bool
    notes: list[str] = field(default_factory=list)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def device(self) -> torch.device:
        """The input device: where token ids and everything fed to the first layer go (device maps
        place later layers elsewhere; hooks move what they need to the tensor they see)."""
        return _embed_device(self.embed)

    def _param_name(self, module: nn.Module | None) -> str | None:
        if module is None:
            return None
        return next(n for n, m in self.model.named_modules() if m is module) + ".weight"

    @property
    def embed_name(self) -> str:
        return self._param_name(self.embed)

    @property
    def unembed_name(self) -> str:
        return self._param_name(self.unembed)

    @property
    def pos_embed_name(self) -> str | None:
        return self._param_name(self.pos_embed)

    def all_writers(self) -> list[ResidualWriter]:
        return [w for per in self.writers for w in per]

    @property
    def is_moe(self) -> bool:
        return any(w.tensor.dim() == 3 for w in self.all_writers()) or any(
            len([w for w in per if w.attr == "weight" and w.tensor.dim() == 2]) > 2 for per in self.writers
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def describe(self) -> dict:
        """Names of the discovered modules, for run metadata and error messages."""
        names = {m: n for n, m in self.model.named_modules()}
        return {
            "layers": names.get(self.layers),
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "n_heads": self.n_heads,
            "head_dim": self.head_dim,
            "embed": names.get(self.embed),
            "unembed": names.get(self.unembed),
            "pos_embed": names.get(self.pos_embed) if self.pos_embed is not None else None,
            "attn_out": names.get(self.attn_out[0]),
            "writers_per_layer": [len(per) for per in self.writers],
            "moe": self.is_moe,
            "writers_layer0": [w.to_json() for w in self.writers[0]],
            "attn_write": names.get(self.attn_write[0]),
            "mlp_write": names.get(self.mlp_write[0]),
            "linear_writes": self.linear_writes,
            "tied_embeddings": self.tied,
        }


def _embed_device(embed: nn.Module) -> torch.device:
    w = embed.weight
    if w.device.type == "meta":  # offloaded by accelerate: inputs go where its hook computes
        dev = getattr(getattr(embed, "_hf_hook", None), "execution_device", None)
        return torch.device(dev if dev is not None else "cpu")
    return w.device


def find_layers(model: nn.Module, n_layers: int) -> nn.ModuleList:
    lists = [
        m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers and n_layers > 0
    ]
    lists = [m for m in lists if all(len(list(layer.children())) >= 2 for layer in m)]
    if not lists:
        raise RefdirError(
            f"unsupported architecture {type(model).__name__}: no list of {n_layers} decoder layers found"
        )
    return lists[0]


def _find_child(layer: nn.Module, kind: str) -> nn.Module:
    """The attention (kind='attn') or MLP (kind='mlp') child of a decoder layer."""
    keys = ("attn", "attention") if kind == "attn" else ("mlp", "feed_forward", "ffn", "moe", "expert")
    for name, child in layer.named_children():
        low = name.lower() + type(child).__name__.lower()
        if kind == "mlp" and any(k in low for k in ("attn", "attention")):
            continue  # GraniteMoeAttention contains "moe"
        if any(k in low for k in keys) and "norm" not in name.lower():
            return child
    raise RefdirError(f"unsupported architecture: no {kind} module in decoder layer {type(layer).__name__}")


def _find_proj(parent: nn.Module, names: tuple[str, ...], d_model: int, what: str) -> nn.Module:
    found = {
        n.split(".")[-1]: m
        for n, m in parent.named_modules()
        if _is_linear_like(m) and _out_features(m) == d_model
    }
    for n in names:
        if n in found:
            return found[n]
    raise RefdirError(
        f"unsupported architecture: no {what} output projection (one of {', '.join(names)} "
        f"writing {d_model} features) in {type(parent).__name__}; "
        f"found {sorted(found) or 'none'}"
    )


def _find_pos_embed(
    model: nn.Module, embed: nn.Module, layers: nn.ModuleList, d_model: int
) -> nn.Embedding | None:
    inside = {id(m) for m in layers.modules()}
    for m in model.modules():
        if (
            isinstance(m, nn.Embedding)
            and m is not embed
            and id(m) not in inside
            and m.embedding_dim == d_model
        ):
            return m
    return None


@torch.no_grad()
def _verify_writes(model: nn.Module, layer: nn.Module, d_model: int) -> tuple[nn.Module, nn.Module]:
    """Find which two children of ``layer`` write the residual stream, by a least-squares fit.

    On a short input, record the layer's input ``x``, its output ``y`` and the output of every
    child that produces ``d_model`` features; the writes are the pair ``(a, m)`` for which
    ``y - x = alpha * a + beta * m`` holds to float precision.
    """
    outs: dict[str, torch.Tensor] = {}
    io: dict[str, torch.Tensor] = {}
    hooks = []
    children = dict(layer.named_children())

    def rec(name):
        def hook(mod, args, out):
            t = first_tensor(out)
            if isinstance(t, torch.Tensor) and t.shape[-1] == d_model:
                outs[name] = t.detach().double().reshape(-1, d_model)

        return hook

    def layer_hook(mod, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        io["x"] = x.detach().double().reshape(-1, d_model)
        io["y"] = first_tensor(out).detach().double().reshape(-1, d_model)

    for name, child in children.items():
        hooks.append(child.register_forward_hook(rec(name)))
    hooks.append(layer.register_forward_hook(layer_hook, with_kwargs=True))
    try:
        gen = torch.Generator().manual_seed(0)
        vocab = model.get_input_embeddings().num_embeddings
        ids = torch.randint(0, vocab, (1, 7), generator=gen).to(_embed_device(model.get_input_embeddings()))
        model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    delta = io["y"] - io["x"]  # [T, d]
    best = None
    for a, m in itertools.permutations(outs, 2):
        basis = torch.stack([outs[a].flatten(), outs[m].flatten()], 1)  # [T*d, 2]
        coef = torch.linalg.lstsq(basis, delta.flatten()[:, None]).solution
        err = (basis @ coef - delta.flatten()[:, None]).norm() / delta.norm().clamp_min(1e-30)
        if best is None or err < best[0]:
            best = (float(err), a, m)
    if best is None or best[0] > _edit_tolerance(model.get_input_embeddings().weight.dtype):
        raise RefdirError(
            f"unsupported architecture: the residual update of {type(layer).__name__} is not a sum of two "
            f"of its children's outputs ({', '.join(outs) or 'none found'}); refdir cannot place its hooks"
        )
    _, a, m = best
    # the attention write is the one computed first in the layer
    order = list(children)
    a, m = sorted((a, m), key=order.index)
    return children[a], children[m]


def _linear_writers(module: nn.Module, name: str) -> list[ResidualWriter]:
    """The weight (and bias) of a Linear/Conv1D writer; ``name`` is the module's full name."""
    out = [ResidualWriter(f"{name}.weight", module, "weight", 0 if isinstance(module, nn.Linear) else 1)]
    if getattr(module, "bias", None) is not None:
        out.append(ResidualWriter(f"{name}.bias", module, "bias", 0))
    return out


def _mlp_writers(mlp: nn.Module, name: str, d_model: int) -> list[ResidualWriter]:
    """Every residual writer of an MLP or mixture-of-experts block (``name``: its full module name).

    Linear/Conv1D modules named like output projections and writing ``d_model`` features (the dense
    down projection, each per-expert Linear, shared experts), and fused expert parameters ``[E, ., .]``
    named like one (``experts.down_proj``) with their ``[E, d]`` biases. The numeric check in
    :func:`_edit_error` then proves the set complete for each kind of layer.
    """
    found: list[ResidualWriter] = []
    for sub, m in mlp.named_modules():
        full = f"{name}.{sub}" if sub else name
        if sub and _is_linear_like(m) and _out_features(m) == d_model and sub.split(".")[-1] in MLP_OUT_NAMES:
            found += _linear_writers(m, full)
            continue
        for pname, p in m.named_parameters(recurse=False):
            low = pname.lower()
            if not any(w in low for w in EXPERT_OUT_WORDS):
                continue
            if p.dim() == 3 and d_model in p.shape[1:]:
                axis = 1 if p.shape[1] == d_model else 2  # [E, d, ff] (Linear layout) or [E, ff, d]
                found.append(
                    ResidualWriter(f"{full}.{pname}", m, pname, axis, ambiguous=p.shape[1] == p.shape[2])
                )
            elif p.dim() == 2 and low.endswith("bias") and p.shape[1] == d_model:
                found.append(ResidualWriter(f"{full}.{pname}", m, pname, 1))  # [E, d] bias of fused experts
    if not found:
        raise RefdirError(
            f"unsupported architecture: no MLP output projection "
            f"(one of {', '.join(MLP_OUT_NAMES)} writing {d_model} features, or fused expert "
            f"parameters) in {type(mlp).__name__}"
        )
    return found


def project_out_axis_(t: torch.Tensor, unit: torch.Tensor, axis: int, block: int = 4096) -> None:
    """In place: t <- t with r̂ projected out of ``axis`` (the d_model axis), in float64 blocks.

    2-D ``[d, in]`` (axis 0): W - r̂(r̂ᵀW); ``[n, d]`` (axis 1): W - (Wr̂)r̂ᵀ; 1-D bias: b - (b·r̂)r̂;
    a leading expert axis is walked one expert at a time. Blocks of 4096 rows/columns keep the float64
    copy small (a whole [vocab, d] embedding in float64 would take GBs).
    """
    if t.dim() > 2:
        if axis == 0:
            raise RefdirError("cannot project along the expert axis of a fused parameter")
        for e in range(t.shape[0]):
            project_out_axis_(t[e], unit, axis - 1, block)
        return
    u = unit.to(device=t.device, dtype=torch.float64)
    if t.dim() == 1:
        b = t.double()
        t.copy_((b - (b @ u) * u).to(t.dtype))
    elif axis == 0:  # [d, in]: column blocks
        for i in range(0, t.shape[1], block):
            blk = t[:, i : i + block].double()
            blk -= torch.outer(u, u @ blk)
            t[:, i : i + block].copy_(blk.to(t.dtype))
    else:  # [n, d]: row blocks
        for i in range(0, t.shape[0], block):
            blk = t[i : i + block].double()
            blk -= torch.outer(blk @ u, u)
            t[i : i + block].copy_(blk.to(t.dtype))


class _Stop(Exception):
    """Ends a verification forward pass once the layer under test has run."""


def _materialized(writers: list[ResidualWriter]) -> bool:
    return all(w.tensor.device.type != "meta" and w.tensor.is_floating_point() for w in writers)


@torch.no_grad()
def _edit_error(
    model: nn.Module,
    layer: nn.Module,
    blocks: tuple[nn.Module, nn.Module],
    writers: list[ResidualWriter],
    d_model: int,
) -> float:
    """Largest relative error of "editing the writers equals projecting the blocks' outputs".

    Runs the model up to ``layer`` twice on a short input: once as it is, recording each block's
    (attention write, MLP write) input and output, once with the layer's writers orthogonalized to a
    random r̂ and each block fed its recorded input. Exact weight orthogonalization needs
    out' = out - (out·r̂)r̂ for both. Weights are restored before returning.
    """
    dev = _embed_device(model.get_input_embeddings())
    gen = torch.Generator().manual_seed(1)
    unit = torch.randn(d_model, generator=gen, dtype=torch.float64)
    unit /= unit.norm()
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (1, 9), generator=gen)
    ids = ids.to(dev)
    seen_in: dict[int, torch.Tensor] = {}
    seen_out: dict[int, list[torch.Tensor]] = {0: [], 1: []}

    def pre(k, replay):
        def hook(mod, args, kwargs):
            if not replay:
                seen_in[k] = hidden_arg(args, kwargs).detach().clone()
                return None
            return replace_hidden_arg(args, kwargs, seen_in[k].to(hidden_arg(args, kwargs).device))

        return hook

    def post(k):
        def hook(mod, args, out):
            seen_out[k].append(first_tensor(out).detach().double().reshape(-1, d_model))

        return hook

    def stop(mod, args, out):
        raise _Stop

    def run(replay: bool) -> None:
        hs = [layer.register_forward_hook(stop)]
        for k, b in enumerate(blocks):
            hs += [
                b.register_forward_pre_hook(pre(k, replay), with_kwargs=True),
                b.register_forward_hook(post(k)),
            ]
        try:
            model(input_ids=ids, use_cache=False)
        except _Stop:
            pass
        finally:
            for h in hs:
                h.remove()

    run(False)
    saved = [w.tensor.detach().clone() for w in writers]
    try:
        for w in writers:
            project_out_axis_(w.tensor.data, unit, w.axis)
        run(True)
    finally:
        for w, t in zip(writers, saved):
            w.tensor.data.copy_(t)
    err = 0.0
    for k in (0, 1):
        y, y2 = seen_out[k][0], seen_out[k][1]
        u = unit.to(y.device)
        want = y - (y @ u)[:, None] * u
        err = max(err, float((y2 - want).norm() / y.norm().clamp_min(1e-30)))
    return err


def _edit_tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2


def layer_kind(layer: nn.Module) -> tuple:
    """Layers of one kind have the same parameter names and shapes (DeepSeek: dense first layers, then
    MoE)."""
    return tuple((n, tuple(p.shape)) for n, p in layer.named_parameters())


def _check_writers(
    model: nn.Module,
    layers: nn.ModuleList,
    attn_write,
    mlp_write,
    writers: list[list[ResidualWriter]],
    d_model: int,
) -> tuple[bool, list[str]]:
    """Whether editing the writers is exact, checked on one materialized layer of every kind.

    A fused ``[E, d, d]`` expert parameter could be laid out either way: its axis is flipped once if the
    first check fails. Returns (exact, notes)."""
    notes: list[str] = []
    kinds: dict[tuple, list[int]] = {}
    for i, layer in enumerate(layers):
        kinds.setdefault(layer_kind(layer), []).append(i)
    exact = True
    for members in kinds.values():
        i = next((j for j in members if _materialized(writers[j])), None)
        if i is None:
            q = writers[members[0]][0].tensor
            if not q.is_floating_point():
                notes.append(
                    "quantized weights: the writers were not checked numerically (orthogonalization "
                    "and export re-read the full-precision source)"
                )
                continue
            notes.append(
                f"layers {members[0]}..{members[-1]} are offloaded: their writers were checked on "
                "the layout alone"
            )
            continue
        tol = _edit_tolerance(writers[i][0].tensor.dtype)
        err = _edit_error(model, layers[i], (attn_write[i], mlp_write[i]), writers[i], d_model)
        if err > tol and any(w.ambiguous for w in writers[i]):  # [E, d, d]: try the other layout
            for j in members:
                writers[j][:] = [
                    ResidualWriter(w.name, w.module, w.attr, 3 - w.axis, True) if w.ambiguous else w
                    for w in writers[j]
                ]
            err = _edit_error(model, layers[i], (attn_write[i], mlp_write[i]), writers[i], d_model)
        if err > tol:
            exact = False
    return exact, notes


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The model's adapter, built (and verified) once and cached on the model object."""
    cached = getattr(model, "_refdir_adapter", None)
    if cached is not None:
        return cached
    adapter = build_adapter(model)
    model._refdir_adapter = adapter
    return adapter


def build_adapter(model: nn.Module) -> ModelAdapter:
    """Discover and verify the layout of a Hugging Face causal LM."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    d_model = int(cfg.hidden_size)
    n_layers = int(getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "n_layer", 0))
    layers = find_layers(model, n_layers)
    embed = model.get_input_embeddings()
    unembed = model.get_output_embeddings()
    if embed is None or unembed is None:
        raise RefdirError(f"unsupported architecture {type(model).__name__}: no input/output embeddings")
    attn = [_find_child(layer, "attn") for layer in layers]
    mlp = [_find_child(layer, "mlp") for layer in layers]
    attn_out = [_find_proj(a, ATTN_OUT_NAMES, d_model, "attention") for a in attn]
    pnames = {id(m): n for n, m in model.named_modules()}
    writers = [
        _linear_writers(o, pnames[id(o)]) + _mlp_writers(m, pnames[id(m)], d_model)
        for o, m in zip(attn_out, mlp)
    ]
    a_write, m_write = _verify_writes(model, layers[0], d_model)
    names = dict(layers[0].named_children())
    a_name = next(n for n, c in names.items() if c is a_write)
    m_name = next(n for n, c in names.items() if c is m_write)
    attn_write = [getattr(layer, a_name) for layer in layers]
    mlp_write = [getattr(layer, m_name) for layer in layers]
    linear, notes = _check_writers(model, layers, attn_write, mlp_write, writers, d_model)
    n_heads = int(getattr(cfg, "num_attention_heads", 0) or getattr(cfg, "n_head", 1))
    in_features = (
        attn_out[0].weight.shape[1] if isinstance(attn_out[0], nn.Linear) else attn_out[0].weight.shape[0]
    )
    head_dim = int(getattr(cfg, "head_dim", None) or in_features // n_heads)
    tied = unembed.weight is embed.weight or (
        embed.weight.device.type != "meta" and unembed.weight.data_ptr() == embed.weight.data_ptr()
    )
    tied = tied or bool(getattr(cfg, "tie_word_embeddings", False) and embed.weight.device.type == "meta")
    if not linear:
        notes.append(
            "residual writes pass through a normalization after the output projections "
            "(sandwich/post-norm): weight orthogonalization can only approximate ablation"
        )
    return ModelAdapter(
        model=model,
        layers=layers,
        embed=embed,
        unembed=unembed,
        pos_embed=_find_pos_embed(model, embed, layers, d_model),
        attn=attn,
        attn_out=attn_out,
        writers=writers,
        attn_write=attn_write,
        mlp_write=mlp_write,
        d_model=d_model,
        n_heads=n_heads,
        head_dim=head_dim,
        linear_writes=linear,
        tied=tied,
        notes=notes,
    )


def input_device(model: nn.Module) -> torch.device:
    """Where token ids go: the input embedding's device (the first of a device map; its execution
    device when accelerate offloads it). Index tensors stay on the CPU: they index tensors on any device."""
    return get_adapter(model).device


def hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden state passed to a decoder layer, positionally or by keyword."""
    return args[0] if args else kwargs["hidden_states"]


def replace_hidden_arg(args: tuple, kwargs: dict, new: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (new,) + tuple(args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = new
    return args, kwargs


def replace_output(out, new: torch.Tensor):
    if isinstance(out, tuple):
        return (new,) + out[1:]
    return new
