"""refdir's loops under lm-evaluation-harness, and one condition's run of every planned task.

The harness builds every request (prompts, few-shot contexts, tokenization, truncation) and scores the
answers; refdir computes them with its own batched forwards (shared prefixes in the KV cache, the
unembedding only at scored tokens, rows that leave a generation batch at their stop sequence). The
harness (PyPI ``lm-eval``, the ``capabilities`` extra) is imported lazily, inside the functions.
"""

from __future__ import annotations

import math
import time

from refdir.core.errors import RefdirError
from refdir.core.types import Model, Tokenizer
from refdir.evaluation.capabilities.results import TaskScores, result_json
from refdir.evaluation.capabilities.tasks import BENCHMARKS, DEFAULT_METRICS, TaskPlan


def _metric_of(task: str) -> tuple[str, str]:
    b = BENCHMARKS.get(task)
    return (b.metric, b.filter) if b else ("", "none")


def _per_item(samples: list[dict], metric: str, filt: str) -> list[float]:
    """The metric's per-item values from the harness's logged samples, in doc order."""
    rows = [s for s in samples if s.get("filter", "none") == filt] or samples
    if not metric:
        metric = next((m for m in DEFAULT_METRICS if m in rows[0]), "")
    if not rows or metric not in rows[0]:
        have = sorted(k for k in (rows[0] if rows else {}) if isinstance(rows[0][k], (int, float)))
        raise RefdirError(f"the harness logged no '{metric}' per item (it has: {', '.join(have) or 'none'})")
    return [float(s[metric]) for s in sorted(rows, key=lambda s: s["doc_id"])]


def run_tasks(
    model: Model,
    tokenizer: Tokenizer,
    tasks: dict[str, str],
    tm,
    num_fewshot: int | None,
    limit: int | None,
    batch_size: int,
    log=print,
    max_gen_toks: int | None = None,
    gen_rows: int | None = None,
) -> dict[str, TaskScores]:
    """Evaluate one condition: ``tasks`` maps the reported name to the harness's task name.

    One harness call per task, so each task's time is measured and a group (MMLU) can be pooled over
    its subjects: the pooled mean is the harness's size-weighted group score. ``limit`` is per task;
    for MMLU it is spread over the subjects (ceil(limit / subjects) each)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = harness_lm(HFLM, model, tokenizer, batch_size, gen_rows or batch_size)
    out: dict[str, TaskScores] = {}
    for name, harness_name in tasks.items():
        lim = limit
        subtasks = _group_members(tm, harness_name)
        if lim is not None and subtasks:
            lim = math.ceil(lim / len(subtasks))
        metric, filt = _metric_of(name)
        t = time.time()
        log(f"capabilities: {name} ({harness_name}{f', limit {lim}' if lim else ''})")
        res = simple_evaluate(
            model=lm,
            tasks=[harness_name],
            num_fewshot=num_fewshot,
            limit=lim,
            log_samples=True,
            task_manager=tm,
            bootstrap_iters=0,
            apply_chat_template=False,
            gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks else None,
        )
        samples = res["samples"]
        items: list[float] = []
        for sub in sorted(samples):  # a group's members in name order, each in doc order
            items += _per_item(samples[sub], metric, filt)
        if not metric:
            metric = next((m for m in DEFAULT_METRICS if m in samples[sorted(samples)[0]][0]), "?")
        out[name] = TaskScores(name, metric if filt == "none" else f"{metric},{filt}", items, time.time() - t)
    return out


def harness_lm(hflm: type, model: Model, tokenizer: Tokenizer, rows: int, gen_rows: int):
    """The harness's HF model over refdir's loaded one, with refdir's forward passes underneath.

    The harness builds every request (prompts, few-shot contexts, tokenization, truncation) and scores
    the answers; refdir computes them: log-likelihoods through
    :func:`~refdir.core.forward.continuation_logprobs`
    (shared prefixes in the KV cache, the unembedding only where a token is scored), greedy generation
    through :func:`~refdir.core.forward.greedy_generate` (rows leave the batch at their stop sequence instead
    of decoding until the last row of the batch stops). Same numbers as the harness's own loops up to
    float rounding (tests); sampling requests go to the harness's loop."""
    from tqdm.auto import tqdm

    from refdir.core.forward import continuation_logprobs

    class RefdirHFLM(hflm):
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            seqs = [(ctx + cont)[-(self.max_length + 1) :] for _, ctx, cont in requests]  # the harness's cut
            bar = tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm, leave=False)
            out = continuation_logprobs(self.model, seqs, [len(c) for _, _, c in requests], rows, bar.update)
            bar.close()
            for (key, _, _), ans in zip(requests, out):
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, ans)
            return out

        def generate_until(self, requests, disable_tqdm: bool = False):
            if not all(_is_greedy(r.args[1]) for r in requests):
                old: int = getattr(self, "batch_size_per_gpu")  # set by the harness
                self.batch_size_per_gpu = gen_rows
                try:
                    return super().generate_until(requests, disable_tqdm)
                finally:
                    self.batch_size_per_gpu = old
            return _greedy_until(self, [r.args for r in requests], gen_rows, disable_tqdm)

    return RefdirHFLM(
        pretrained=model, tokenizer=tokenizer, batch_size=rows, max_batch_size=max(rows, gen_rows)
    )


def _is_greedy(gen_kwargs: dict) -> bool:
    """A request the argmax loop can serve: no sampling, no beams."""
    g = gen_kwargs or {}
    sampled = g.get("do_sample") or (g.get("temperature") or 0.0) > 0.0
    return not sampled and g.get("num_beams", 1) == 1


def _greedy_until(lm, args: list[tuple[str, dict]], gen_rows: int, disable_tqdm: bool) -> list[str]:
    """The harness's ``generate_until`` on refdir's greedy loop: the same context encoding and left
    truncation (``max_length - max_gen_toks``), the same stop sequences (the EOS text added) and the same
    post-processing; rows stop at a stop sequence or an end token, longest prompts first."""
    import json

    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
    from tqdm.auto import tqdm

    from refdir.core.forward import end_token_ids, greedy_generate
    from refdir.core.prefix import split_prefix
    from refdir.core.templates import left_padded

    eos = lm.tok_decode(lm.eot_token_id, skip_special_tokens=False)
    ends = end_token_ids(lm.model, lm.tokenizer)
    groups: dict[str, list[int]] = {}
    for i, (_, g) in enumerate(args):
        groups.setdefault(json.dumps(g, sort_keys=True, default=str), []).append(i)
    out: list[str] = [""] * len(args)
    bar = tqdm(total=len(args), desc="generate_until", disable=disable_tqdm, leave=False)
    for idx in groups.values():
        kwargs = normalize_gen_kwargs(dict(args[idx[0]][1]), lm.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
        n_new = kwargs.pop("max_gen_toks")
        enc = {
            i: lm.tok_batch_encode(
                [args[i][0]], left_truncate_len=lm.max_length - n_new, truncation=lm.truncation
            )[0][0].tolist()
            for i in idx
        }
        order = sorted(idx, key=lambda i: -len(enc[i]))  # the longest first: a memory error shows at once

        def stopped(tokens: list[int]) -> bool:
            text = lm.tok_decode(tokens)
            return any(t and t in text for t in until)

        for b in range(0, len(order), max(1, gen_rows)):
            rows = order[b : b + gen_rows]
            batch = left_padded([enc[i] for i in rows], 1, "cpu")  # split_prefix moves it
            pb = split_prefix(batch, model=lm.model, extra=n_new)
            tokens, _ = greedy_generate(lm.model, pb, n_new, ends, settled=stopped, on_done=bar.update)
            for i, toks in zip(rows, tokens):
                s = postprocess_generated_text(lm.tok_decode(toks), until, None)
                out[i] = s
                lm.cache_hook.add_partial("generate_until", args[i], s)
    bar.close()
    return out


def _group_members(tm, name: str) -> list[str]:
    """The leaf tasks of a harness group (empty for a plain task)."""
    if name not in tm.all_groups:
        return []
    return sorted(tm.load([name])["tasks"])


# 8 rows: chosen under the harness's own loop ([rows, tokens, vocab] log-probs: 32 rows of 800 MMLU tokens
# = 15 GB); refdir's loop unembeds only scored tokens, so wider batches fit (not yet measured for speed)
CPU_HARNESS_ROWS = 8
CPU_HARNESS_GEN_ROWS = 64  # GSM8K's 5-shot prompts are ~1k tokens: 64 rows' KV cache stays a few GB


def harness_rows(rt) -> int:
    """Rows per harness forward: the user's batch size, else the runtime's prompt rows, capped on the CPU
    (seen on the 0.5B under the harness's own loop: at 32 rows the first MMLU batch took 100 s and 9 GB; at
    8 rows all of MMLU's first 200 requests took 70 s). ``--batch-size`` overrides."""
    if rt.batch.source == "user" or rt.device.type != "cpu":
        return rt.batch.prompt_rows
    return min(rt.batch.prompt_rows, CPU_HARNESS_ROWS)


def harness_gen_rows(rt) -> int:
    """Rows per harness generation batch: the runtime's generation rows, capped on the CPU."""
    if rt.device.type != "cpu":
        return rt.batch.gen_rows
    return min(rt.batch.gen_rows, CPU_HARNESS_GEN_ROWS)


def harness_batches(rt) -> dict:
    return {"loglikelihood_rows": harness_rows(rt), "generation_rows": harness_gen_rows(rt)}


def run_condition(rt, plan: TaskPlan, log=print) -> dict[str, TaskScores]:
    """Every task of the plan on the runtime's model as it is now."""
    return run_tasks(
        rt.model,
        rt.tokenizer,
        plan.names,
        plan.tm,
        plan.settings["num_fewshot"],
        plan.settings["limit"],
        harness_rows(rt),
        log,
        plan.settings["max_gen_toks"],
        harness_gen_rows(rt),
    )


def evaluate_capabilities(rt, direction, plan: TaskPlan, log=print) -> dict:
    """Baseline, then the same loaded model orthogonalized in place (no second copy), on the same items.

    ``direction`` may be ``None``: one condition (e.g. an exported checkpoint given as the model). The
    model is left orthogonalized: pass one this process no longer needs unmodified."""
    from refdir.method.interventions import orthogonalize_weights

    base = run_condition(rt, plan, log)
    treated = None
    if direction is not None:
        log("capabilities: orthogonalizing the weights (in place) and rerunning the same items")
        orthogonalize_weights(rt.model, direction.vector, allow_approximate=True)
        treated = run_condition(rt, plan, log)
    return result_json(rt.spec, direction, plan, base, treated, harness_batches(rt))
