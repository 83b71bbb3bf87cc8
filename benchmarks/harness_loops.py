"""refdir's forward loops under lm-evaluation-harness vs the harness's own, in one process.

    python benchmarks/harness_loops.py [--model qwen2.5-coder-0.5b-instruct]
        [--tasks mmlu,truthfulqa_mc2,gsm8k]
        [--limit 20] [--max-gen-toks 256] [--data-dir ../shared/benchmarks]

Both run the same harness requests (the harness builds prompts, few-shot contexts and scores): first the
harness's ``HFLM`` loops at the rows refdir used before (8 rows per log-likelihood forward with full
[rows, tokens, vocab] log-probs, generation padded until the batch's last row stops), then refdir's
(:func:`refdir.core.forward.continuation_logprobs`: shared prefixes in the KV cache, duplicate rows once,
the unembedding only at scored tokens; :func:`refdir.core.forward.greedy_generate`: rows leave at their stop
sequence). Prints each task's seconds both ways, the ratio, and how many per-item scores differ;
last line ``harness_s=… refdir_s=… speedup=… items_differ=…``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--tasks", default="mmlu,truthfulqa_mc2,gsm8k")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--max-gen-toks", type=int, default=None)
    ap.add_argument("--rows", type=int, default=None, help="refdir's log-likelihood rows (default: policy)")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "benchmarks"))
    a = ap.parse_args()

    from refdir.core.runtime import Runtime
    from refdir.evaluation import capabilities
    from refdir.evaluation.capabilities import harness as cap  # the loops run_condition calls

    rt = Runtime.load(a.model)
    refdir_lm, old_rows = cap.harness_lm, cap.CPU_HARNESS_ROWS

    def harness_lm(hflm, model, tokenizer, rows, gen_rows):  # the harness's own loops, as refdir ran them
        class Plain(hflm):
            def generate_until(self, requests, disable_tqdm: bool = False):
                old, self.batch_size_per_gpu = self.batch_size_per_gpu, gen_rows
                try:
                    return super().generate_until(requests, disable_tqdm)
                finally:
                    self.batch_size_per_gpu = old

        return Plain(
            pretrained=model, tokenizer=tokenizer, batch_size=old_rows, max_batch_size=max(rows, gen_rows)
        )

    quiet = lambda *_: None  # noqa: E731
    with capabilities.plan_tasks(a.tasks, a.data_dir, a.limit, None, a.max_gen_toks) as plan:
        cap.harness_lm = harness_lm
        theirs = cap.run_condition(rt, plan, quiet)
        cap.harness_lm, cap.CPU_HARNESS_ROWS = refdir_lm, a.rows or cap.CPU_HARNESS_ROWS
        ours = cap.run_condition(rt, plan, quiet)
    differ = 0
    head = f"{'task':16} {'n':>4} {'harness s':>10} {'refdir s':>9} {'speedup':>8}"
    print(f"{head}  items that differ (> 1e-4)")
    for name in ours:
        t, o = theirs[name], ours[name]
        d = sum(abs(x - y) > 1e-4 for x, y in zip(t.items, o.items)) + abs(len(t.items) - len(o.items))
        differ += d
        row = f"{name:16} {len(o.items):4d} {t.seconds:10.1f} {o.seconds:9.1f}"
        print(f"{row} {t.seconds / o.seconds:8.2f}  {d}")
    ts, os_ = sum(s.seconds for s in theirs.values()), sum(s.seconds for s in ours.values())
    print(f"harness_s={ts:.1f} refdir_s={os_:.1f} speedup={ts / os_:.2f} items_differ={differ}")


if __name__ == "__main__":
    main()
