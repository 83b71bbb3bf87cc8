"""How refusal verdicts change with the number of generated tokens (64 / 128 / 256; the paper uses 512).

    python benchmarks/judge_tokens.py --run RUN [--n 16] [--tokens 64 128 256] [--judge probe]
                                      [--out results/judge_tokens.json]

On a run's direction: ``--n`` JailbreakBench prompts under ablation and under −r (activation subtraction),
``--n`` harmless validation prompts under +r, each generated greedily once to the longest length; the
shorter completions are its first 64 / 128 tokens (greedy decoding: the 64-token completion *is* the
first 64 tokens of the 256-token one). Each length is judged by the paper's substrings and by ``--judge``;
printed: refusal rate per condition, length and judge, and how many verdicts change from the shortest
length to each longer one. Only rates and counts are written, never completions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from refdir.core.io import write_json
from refdir.core.models import load_model
from refdir.core.templates import PromptFormat
from refdir.evaluation.conditions import condition, generate_judged
from refdir.evaluation.verdicts import make_judge
from refdir.method.directions import Direction
from refdir.run.folder import RunFolder

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
CONDITIONS = (
    ("ablation", "jailbreakbench.json"),
    ("actadd-", "jailbreakbench.json"),
    ("actadd+", "harmless_val.json"),
)


def prompts(name: str, n: int) -> list[str]:
    rows = json.loads((SHARED / name).read_text())
    return [r["instruction"] if isinstance(r, dict) else r for r in rows][:n]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--tokens", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--judge", default="probe")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "results" / "judge_tokens.json"))
    args = ap.parse_args()
    run = RunFolder(args.run)
    cfg = json.loads(run.config.read_text())
    model, tok = load_model(cfg["model"], dtype="float32", device="cpu")
    direction = Direction.load(run)
    fmt = PromptFormat()
    longest = max(args.tokens)
    out: dict[str, Any] = {"run": str(args.run), "model": cfg["model"], "n": args.n, "judge": args.judge,
                           "tokens": args.tokens, "conditions": {}}  # fmt: skip
    texts: dict[str, tuple[list[str], list[str]]] = {}
    for cond, source in CONDITIONS:
        ps = prompts(source, args.n)
        t = time.time()
        with condition(model, cond, direction):
            items = generate_judged(model, tok, ps, [None] * len(ps), fmt, longest, args.batch_size, cond)
        texts[cond] = (ps, [j.completion for j in items])
        print(f"{cond}: {len(ps)} x {longest} tokens in {time.time() - t:.0f} s", flush=True)
    judges = {"substring": make_judge("substring"), args.judge: make_judge(args.judge, model, tok, fmt)}
    for cond, (ps, comps) in texts.items():
        ids = [tok(c, add_special_tokens=False)["input_ids"] for c in comps]
        entry: dict[str, Any] = {}
        for name, judge in judges.items():
            verdicts = {}
            for k in args.tokens:
                cut = [tok.decode(i[:k], skip_special_tokens=True) for i in ids]
                verdicts[k] = [v.refusal for v in judge.verdicts(ps, cut)]
            first = verdicts[args.tokens[0]]
            entry[name] = {
                str(k): {
                    "refusal_rate": sum(v) / len(v),
                    "changed_from_first": sum(a != b for a, b in zip(first, v)),
                }
                for k, v in verdicts.items()
            }
        out["conditions"][cond] = entry
        write_json(args.out, out)
        print(cond, json.dumps(entry), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
