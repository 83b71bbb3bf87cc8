"""GPU check on a random-weight model of a real shape (default Llama-3.1-8B, bf16): no weights travel.

    python benchmarks/gpu_check.py [--shape llama-3.1-8b] [--layers N] [--out gpu_check.json]

Measures, in one process on one CUDA device: extraction tokens/s (mean activations at every layer),
selection seconds per candidate (refdir's scorer on 32+32 prompts, pruned), greedy decoding tokens/s at
the largest batch that fits (doubling until out of memory or no faster), its fraction of the
memory-bandwidth roofline (weights + KV read once per step), in-place orthogonalization seconds, streaming
export seconds, and peak GPU memory. Random weights give meaningless directions but real costs.
Last line: ``extract_select_s=… decode_tok_s=… decode_roofline=… ortho_s=… export_s=… peak_gib=…``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "llama-3.1-8b": (4096, 14336, 32, 32, 8, 128256),
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, 128256),
    # a CPU smoke test of this script: python benchmarks/gpu_check.py --shape smoke --device cpu
    "smoke": (128, 256, 4, 4, 2, 1024),
}
HBM_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}  # vendor peak bandwidth, GB/s


def build(shape: str, layers: int | None, device: str):
    import transformers

    h, ff, n, heads, kv, vocab = SHAPES[shape]
    cfg = transformers.LlamaConfig(
        hidden_size=h,
        intermediate_size=ff,
        num_hidden_layers=layers or n,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    )
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.eval().requires_grad_(False)
    model.refdir_spec = f"random-{shape}"
    return model


def tokenizer():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny import make_tokenizer  # a small BPE with a chat template; ids < 640 are valid in any vocab

    return make_tokenizer("llama3")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    from refdir.core.forward import greedy_generate, split_prefix
    from refdir.core.templates import tokenize_prompts
    from refdir.method.activations import mean_activations
    from refdir.method.data import load_builtin
    from refdir.method.directions import candidate_directions
    from refdir.method.interventions import orthogonalize_weights
    from refdir.method.selection import SelectionConfig, select_direction

    dev = a.device
    cuda = dev.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model, tok = build(a.shape, a.layers, dev), tokenizer()
    res: dict = {"shape": a.shape, "gpu": torch.cuda.get_device_name(0) if cuda else "cpu"}
    harm = [p.instruction for p in load_builtin("harmful")][:128]
    safe = [p.instruction for p in load_builtin("harmless")][:128]
    hb, sb = tokenize_prompts(tok, harm, device=dev), tokenize_prompts(tok, safe, device=dev)
    sync()
    t = time.time()
    mh, ms = mean_activations(model, hb, batch_size=64), mean_activations(model, sb, batch_size=64)
    sync()
    n_tok = int(hb.attention_mask.sum() + sb.attention_mask.sum())
    res["extract_s"] = time.time() - t
    res["extract_tok_s"] = n_tok / res["extract_s"]
    cands = candidate_directions(mh, ms)
    t = time.time()
    sel = select_direction(
        model,
        cands,
        tokenize_prompts(tok, harm[:32], device=dev),
        tokenize_prompts(tok, safe[:32], device=dev),
        [40, 50],
        SelectionConfig(induce_threshold=-1e9, kl_threshold=1e9),
        progress=False,
    )
    sync()
    res["select_s"] = time.time() - t
    scored = int(sum(1 for row in sel.bypass.tolist() for v in row if v == v))
    res["select_s_per_scored_candidate"] = res["select_s"] / max(scored, 1)
    res["extract_select_s"] = res["extract_s"] + res["select_s"]
    # greedy decoding: batch doubles while it fits and gets faster
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    best, bs = None, 16
    while bs <= (1024 if cuda else 32):
        try:
            b = tokenize_prompts(tok, (safe * 8)[:bs], device=dev)
            pb = split_prefix(b, model=model, extra=64)
            sync()
            t = time.time()
            new, _ = greedy_generate(model, pb, 64, [-1])  # no end token: every row decodes 64 tokens
            sync()
            rate = sum(len(x) for x in new) / (time.time() - t)
        except torch.OutOfMemoryError:
            break
        if best is not None and rate < best[1] * 1.05:
            break
        best, bs = (bs, rate), bs * 2
    res["decode_batch"], res["decode_tok_s"] = best
    bw = next((v for k, v in HBM_GBS.items() if k in res["gpu"]), None)
    if bw:  # per step: every weight once + the KV cache (~avg 64 tokens of context) once
        kv = 2 * SHAPES[a.shape][2] * SHAPES[a.shape][4] * 128 * 2 * 96 * best[0]
        res["decode_roofline"] = best[1] / (best[0] * bw * 1e9 / (params + kv))
    t = time.time()
    orthogonalize_weights(model, cands[-1, min(5, cands.shape[1] - 1)])
    sync()
    res["ortho_s"] = time.time() - t
    res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    del model
    if cuda:
        torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as d:  # streaming export of a saved copy (CPU side, disk speed)
        from refdir.method.directions import Direction
        from refdir.outputs.export import export_streaming

        small = build(a.shape, 4, "cpu")
        small.save_pretrained(Path(d) / "src")
        tok.save_pretrained(Path(d) / "src")
        Direction(cands[-1, 1].cpu(), 1, -1, "").save(Path(d) / "dir" / "direction")
        t = time.time()
        export_streaming(str(Path(d) / "src"), None, Path(d) / "dir", Path(d) / "out")
        res["export_s_4_layers"] = time.time() - t
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    print(
        " ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in res.items()
            if k
            in (
                "extract_select_s",
                "decode_tok_s",
                "decode_roofline",
                "ortho_s",
                "export_s_4_layers",
                "peak_gib",
            )
        )
    )


if __name__ == "__main__":
    main()
