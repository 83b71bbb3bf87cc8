"""Does vLLM reproduce refdir's greedy loop, and how fast is it? (the vLLM-backend question of issue 14)

    python benchmarks/vllm_agreement.py [--model qwen2.5-coder-0.5b-instruct] [--n 32] [--tokens 64] \
        [--vllm-python /path/to/venv-with-vllm/bin/python]

Both on the same prompts (the first N of the built-in harmful set, the model's chat template), greedy,
the same token budget, one after the other on this machine: refdir's own loop in this process, then vLLM in
``--vllm-python`` (a separate environment: vLLM pins its own torch/transformers). Prints tokens/s of each
and the greedy agreement (rows identical, and the mean fraction of tokens that match up to the first
difference). If vLLM fails, prints its error's last line: the backend stays out of refdir until it runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# a file with a main guard: vLLM starts its engine core with multiprocessing's spawn
VLLM_SCRIPT = r"""
import json, sys, time


def main():
    args = json.loads(open(sys.argv[1]).read())
    from vllm import LLM, SamplingParams
    t = time.time()
    llm = LLM(model=args["folder"], dtype="float32", max_model_len=2048, enforce_eager=True, seed=0,
              gpu_memory_utilization=0.3)  # on the CPU backend: the share of RAM for the KV cache
    load = time.time() - t
    t = time.time()
    outs = llm.generate(args["texts"], SamplingParams(temperature=0.0, max_tokens=args["tokens"]))
    gen = time.time() - t
    json.dump({"load_s": load, "gen_s": gen, "ids": [list(o.outputs[0].token_ids) for o in outs]},
              open(args["out"], "w"))


if __name__ == "__main__":
    main()
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--vllm-python", default=sys.executable)
    a = ap.parse_args()

    from refdir.core.forward import end_token_ids, greedy_generate, split_prefix
    from refdir.core.runtime import Runtime
    from refdir.core.templates import format_prompt
    from refdir.method.data import load_builtin

    rt = Runtime.load(a.model)
    prompts = [p.instruction for p in load_builtin("harmful")][: a.n]
    t = time.time()
    pb = split_prefix(rt.encode(prompts), True, rt.model, extra=a.tokens)
    ours, _ = greedy_generate(rt.model, pb, a.tokens, end_token_ids(rt.model, rt.tokenizer))
    ours_s = time.time() - t
    n_ours = sum(map(len, ours))
    print(f"refdir loop: {n_ours} tokens in {ours_s:.1f} s = {n_ours / ours_s:.1f} tok/s ({a.n} rows)")

    folder = rt.model.config._name_or_path  # the (dequantized) checkpoint folder
    texts = [format_prompt(rt.tokenizer, p, rt.fmt) for p in prompts]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "vllm.json"
        args = {"folder": str(folder), "texts": texts, "tokens": a.tokens, "out": str(out)}
        (Path(tmp) / "run_vllm.py").write_text(VLLM_SCRIPT)
        (Path(tmp) / "args.json").write_text(json.dumps(args))
        p = subprocess.run(
            [a.vllm_python, str(Path(tmp) / "run_vllm.py"), str(Path(tmp) / "args.json")],
            capture_output=True,
            text=True,
        )
        if p.returncode != 0:
            lines = [line for line in p.stderr.strip().splitlines() if line.strip()] or ["?"]
            causes = [x for x in lines if "Error:" in x and "Engine core initialization failed" not in x]
            err = causes or lines  # the root cause, not the engine's "see above"
            print(f"vllm failed (exit {p.returncode}): {err[-1][:300]}")
            print(f"vllm_ok=false refdir_tok_s={n_ours / ours_s:.1f}")
            return
        v = json.loads(out.read_text())
    n_v = sum(map(len, v["ids"]))
    same, prefix = 0, []
    for x, y in zip(ours, v["ids"]):
        x = [int(i) for i in x]
        k = next((i for i, (p_, q) in enumerate(zip(x, y)) if p_ != q), min(len(x), len(y)))
        same += x == y
        prefix.append(k / max(len(x), len(y), 1))
    print(
        f"vllm: load {v['load_s']:.1f} s, {n_v} tokens in {v['gen_s']:.1f} s = {n_v / v['gen_s']:.1f} tok/s"
    )
    print(
        f"vllm_ok=true identical_rows={same}/{len(ours)} "
        f"mean_agreeing_prefix={sum(prefix) / len(prefix):.3f} "
        f"refdir_tok_s={n_ours / ours_s:.1f} vllm_tok_s={n_v / v['gen_s']:.1f}"
    )


if __name__ == "__main__":
    main()
