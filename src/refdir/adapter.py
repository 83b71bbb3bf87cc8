"""One architecture adapter: where a causal LM keeps its layers and residual-stream writes.

Everything that hooks or edits a model goes through :class:`ModelAdapter`, so no code elsewhere
branches on the model family. The adapter learns the layout by inspecting the module tree and
then *verifies* it numerically: on a short input, the change of the residual stream across a
decoder layer must be a linear combination of the outputs of the two modules it calls the
attention write and the MLP write. That single rule covers pre-norm blocks (Llama, Qwen,
Mistral, Phi-3), scaled residuals (Granite) and sandwich norms (Gemma 2/3, OLMo 2), and it
fails loudly on anything it does not understand instead of silently skipping a write.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import RefdirError

# Names under which transformers models keep output projections (a vocabulary, not a family table).
ATTN_OUT_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "wo", "out")
MLP_OUT_NAMES = ("down_proj", "fc2", "c_proj", "dense_4h_to_h", "w2", "fc_out", "wo", "proj_out")


def _first_tensor(x):
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
    mlp_out: list[nn.Module]  # the MLP's output projection
    attn_write: list[nn.Module]  # the module whose output is added to the residual stream
    mlp_write: list[nn.Module]
    d_model: int
    n_heads: int
    head_dim: int
    linear_writes: bool  # writes are the projections themselves: orthogonalization is exact
    tied: bool
    notes: list[str] = field(default_factory=list)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def describe(self) -> dict:
        """Names of the discovered modules, for run metadata and error messages."""
        names = {m: n for n, m in self.model.named_modules()}
        return {
            "layers": names.get(self.layers), "n_layers": self.n_layers, "d_model": self.d_model,
            "n_heads": self.n_heads, "head_dim": self.head_dim,
            "embed": names.get(self.embed), "unembed": names.get(self.unembed),
            "pos_embed": names.get(self.pos_embed) if self.pos_embed is not None else None,
            "attn_out": names.get(self.attn_out[0]), "mlp_out": names.get(self.mlp_out[0]),
            "attn_write": names.get(self.attn_write[0]), "mlp_write": names.get(self.mlp_write[0]),
            "linear_writes": self.linear_writes, "tied_embeddings": self.tied,
        }


def _find_layers(model: nn.Module, n_layers: int) -> nn.ModuleList:
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers and n_layers > 0]
    lists = [m for m in lists if all(len(list(layer.children())) >= 2 for layer in m)]
    if not lists:
        raise RefdirError(f"unsupported architecture {type(model).__name__}: no list of {n_layers} decoder layers found")
    return lists[0]


def _find_child(layer: nn.Module, kind: str) -> nn.Module:
    """The attention (kind='attn') or MLP (kind='mlp') child of a decoder layer."""
    keys = ("attn", "attention") if kind == "attn" else ("mlp", "feed_forward", "ffn")
    for name, child in layer.named_children():
        low = name.lower() + type(child).__name__.lower()
        if any(k in low for k in keys) and "norm" not in name.lower():
            return child
    raise RefdirError(f"unsupported architecture: no {kind} module in decoder layer {type(layer).__name__}")


def _find_proj(parent: nn.Module, names: tuple[str, ...], d_model: int, what: str) -> nn.Module:
    found = {n.split(".")[-1]: m for n, m in parent.named_modules() if _is_linear_like(m) and _out_features(m) == d_model}
    for n in names:
        if n in found:
            return found[n]
    raise RefdirError(f"unsupported architecture: no {what} output projection (one of {', '.join(names)} writing "
                      f"{d_model} features) in {type(parent).__name__}; found {sorted(found) or 'none'}")


def _find_pos_embed(model: nn.Module, embed: nn.Module, layers: nn.ModuleList, d_model: int) -> nn.Embedding | None:
    inside = {id(m) for m in layers.modules()}
    for m in model.modules():
        if isinstance(m, nn.Embedding) and m is not embed and id(m) not in inside and m.embedding_dim == d_model:
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
            t = _first_tensor(out)
            if isinstance(t, torch.Tensor) and t.shape[-1] == d_model:
                outs[name] = t.detach().double().reshape(-1, d_model)
        return hook

    def layer_hook(mod, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        io["x"] = x.detach().double().reshape(-1, d_model)
        io["y"] = _first_tensor(out).detach().double().reshape(-1, d_model)

    for name, child in children.items():
        hooks.append(child.register_forward_hook(rec(name)))
    hooks.append(layer.register_forward_hook(layer_hook, with_kwargs=True))
    try:
        gen = torch.Generator().manual_seed(0)
        vocab = model.get_input_embeddings().num_embeddings
        ids = torch.randint(0, vocab, (1, 7), generator=gen).to(model.get_input_embeddings().weight.device)
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
    if best is None or best[0] > 1e-4:
        raise RefdirError(
            f"unsupported architecture: the residual update of {type(layer).__name__} is not a sum of two of its "
            f"children's outputs ({', '.join(outs) or 'none found'}); refdir cannot place its hooks")
    _, a, m = best
    # the attention write is the one computed first in the layer
    order = list(children)
    a, m = sorted((a, m), key=order.index)
    return children[a], children[m]


@torch.no_grad()
def _same_output(model: nn.Module, outer: nn.Module, inner: nn.Module) -> bool:
    """True when ``outer``'s output is exactly ``inner``'s (e.g. self_attn returns o_proj's output)."""
    seen = {}
    h1 = outer.register_forward_hook(lambda m, a, o: seen.__setitem__("outer", _first_tensor(o)))
    h2 = inner.register_forward_hook(lambda m, a, o: seen.__setitem__("inner", _first_tensor(o)))
    try:
        ids = torch.arange(5, device=model.get_input_embeddings().weight.device)[None] + 3
        model(input_ids=ids, use_cache=False)
    finally:
        h1.remove()
        h2.remove()
    if "outer" not in seen or "inner" not in seen or seen["outer"].shape != seen["inner"].shape:
        return False
    return bool(torch.equal(seen["outer"], seen["inner"]))


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
    layers = _find_layers(model, n_layers)
    embed = model.get_input_embeddings()
    unembed = model.get_output_embeddings()
    if embed is None or unembed is None:
        raise RefdirError(f"unsupported architecture {type(model).__name__}: no input/output embeddings")
    attn = [_find_child(layer, "attn") for layer in layers]
    mlp = [_find_child(layer, "mlp") for layer in layers]
    attn_out = [_find_proj(a, ATTN_OUT_NAMES, d_model, "attention") for a in attn]
    mlp_out = [_find_proj(m, MLP_OUT_NAMES, d_model, "MLP") for m in mlp]
    a_write, m_write = _verify_writes(model, layers[0], d_model)
    names = dict(layers[0].named_children())
    a_name = next(n for n, c in names.items() if c is a_write)
    m_name = next(n for n, c in names.items() if c is m_write)
    attn_write = [getattr(layer, a_name) for layer in layers]
    mlp_write = [getattr(layer, m_name) for layer in layers]
    linear = _same_output(model, attn_write[0], attn_out[0]) and _same_output(model, mlp_write[0], mlp_out[0])
    n_heads = int(getattr(cfg, "num_attention_heads", 0) or getattr(cfg, "n_head", 1))
    in_features = attn_out[0].weight.shape[1] if isinstance(attn_out[0], nn.Linear) else attn_out[0].weight.shape[0]
    head_dim = int(getattr(cfg, "head_dim", None) or in_features // n_heads)
    tied = unembed.weight.data_ptr() == embed.weight.data_ptr()
    notes = []
    if not linear:
        notes.append("residual writes pass through a normalization after the output projections "
                     "(sandwich/post-norm): weight orthogonalization can only approximate ablation")
    return ModelAdapter(
        model=model, layers=layers, embed=embed, unembed=unembed,
        pos_embed=_find_pos_embed(model, embed, layers, d_model), attn=attn, attn_out=attn_out, mlp_out=mlp_out,
        attn_write=attn_write, mlp_write=mlp_write, d_model=d_model, n_heads=n_heads, head_dim=head_dim,
        linear_writes=linear, tied=tied, notes=notes)


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
