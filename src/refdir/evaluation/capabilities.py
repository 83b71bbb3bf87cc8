"""Capability benchmarks through lm-evaluation-harness, baseline vs orthogonalized, with paired deltas.

The paper's claim is two-sided: orthogonalization removes refusal *and* leaves capabilities intact (its
Tables 3 and 6: MMLU, ARC, GSM8K, TruthfulQA, WinoGrande, HellaSwag, no chat template). Both conditions run
on the same items, so each task's change is reported with a *paired* interval over per-item differences:
with 100 items an unpaired 95% interval is about ±9 points, a paired one resolves the 1–2 point changes the
paper reports.

The harness (PyPI ``lm-eval``, the ``capabilities`` extra) is imported only here, lazily. With
``data_dir`` the paper's six benchmarks are read from local copies in their original formats (the layout
of ``../shared/benchmarks/``): refdir writes task YAMLs that ``include:`` the harness's own task
definitions (prompts, metrics, filters, ``!function`` helpers) and override only where the data comes from.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from refdir.core.errors import RefdirError

INSTALL_HINT = "pip install 'refdir[capabilities]'  (lm-eval>=0.4.3)"


@dataclass(frozen=True)
class Benchmark:
    """One of the paper's benchmarks: the harness task, the metric it reports and its local files."""

    task: str  # the harness's task (or group) name
    metric: str  # the harness's metric for this task (paper: acc / acc_norm / exact_match / mc2)
    filter: str = "none"  # the harness's filter whose metric is reported
    files: tuple[str, ...] = ()  # paths under the data dir that must exist


BENCHMARKS: dict[str, Benchmark] = {
    "mmlu": Benchmark("mmlu", "acc", files=("mmlu/data/test", "mmlu/data/dev")),
    "arc_challenge": Benchmark(
        "arc_challenge",
        "acc_norm",
        files=(
            "arc_challenge/ARC-Challenge-Test.jsonl",
            "arc_challenge/ARC-Challenge-Train.jsonl",
            "arc_challenge/ARC-Challenge-Dev.jsonl",
        ),
    ),
    "gsm8k": Benchmark(
        "gsm8k", "exact_match", "strict-match", files=("gsm8k/test.jsonl", "gsm8k/train.jsonl")
    ),
    "truthfulqa_mc1": Benchmark("truthfulqa_mc1", "acc", files=("truthfulqa/truthfulqa_mc_v0.hf.jsonl",)),
    "truthfulqa_mc2": Benchmark("truthfulqa_mc2", "acc", files=("truthfulqa/truthfulqa_mc_v0.hf.jsonl",)),
    "winogrande": Benchmark("winogrande", "acc", files=("winogrande/dev.jsonl", "winogrande/train_l.jsonl")),
    "hellaswag": Benchmark("hellaswag", "acc_norm", files=("hellaswag/hellaswag_val_klosax.jsonl",)),
}
_OMIT = object()  # a key left out of a local task YAML
# the harness's MMLU prompt over the CSV's columns; ARC's gold index from the original nested choices
MMLU_TEXT = "{{question.strip()}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\nAnswer:"
ARC_TARGET = "{{(question.choices | map(attribute='label') | list).index(answerKey)}}"
PAPER_TASKS = ("mmlu", "arc_challenge", "gsm8k", "truthfulqa_mc2", "winogrande", "hellaswag")
# the harness metric each hub task reports when refdir has no entry for it: its first metric, unfiltered
DEFAULT_METRICS = ("acc_norm", "acc", "exact_match", "mc2")


# ----------------------------------------------------------------------------------------------
# Paired statistics


def mean_stderr(x: list[float]) -> float:
    """The standard error of a mean (sample standard deviation / sqrt(n)), as the harness reports it."""
    n = len(x)
    if n < 2:
        return float("nan")
    m = sum(x) / n
    return math.sqrt(sum((v - m) ** 2 for v in x) / (n - 1) / n)


def mcnemar_exact(lost: int, gained: int) -> float:
    """Two-sided exact McNemar p-value: under "no change" each discordant item (right in one condition
    only) is equally likely to go either way, so min(lost, gained) follows Binomial(lost + gained, 1/2)."""
    n, k = lost + gained, min(lost, gained)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def changed_items(r: dict) -> str:
    """``"4 lost, 0 gained, exact p 0.12"`` for a right/wrong result (``""`` for others): the items
    behind its Δ, as the table, the report and the run summary print them."""
    if "mcnemar_p" not in r:
        return ""
    return f"{r['lost']} lost, {r['gained']} gained, exact p {r['mcnemar_p']:.2g}"


def paired_delta(baseline: list[float], treated: list[float], z: float = 1.959964) -> dict:
    """Δ = mean(treated − baseline) over the same items, its paired standard error and 95% interval.

    The analytic paired form: the per-item differences d_i have standard error sd(d)/sqrt(n), which is
    small when both conditions get the same items right (their covariance cancels), unlike the unpaired
    sqrt(se_b² + se_t²). For right/wrong scores the interval rests on the few items that changed, and
    with a handful of them the normal form is too narrow (4 lost, 0 gained of 114 excludes 0, yet a
    fair coin gives 4-0 one time in eight): those also get the items lost and gained and the exact
    McNemar p-value."""
    if len(baseline) != len(treated):
        raise ValueError(f"paired scores need the same items: {len(baseline)} vs {len(treated)}")
    d = [t - b for b, t in zip(baseline, treated)]
    delta = sum(d) / len(d) if d else float("nan")
    se = mean_stderr(d)
    out = {
        "delta": delta,
        "delta_stderr": se,
        "delta_ci95": [float("nan")] * 2 if se != se else [delta - z * se, delta + z * se],
    }
    if all(v in (0.0, 1.0) for v in baseline + treated):
        lost = sum(1 for b, t in zip(baseline, treated) if b > t)
        gained = sum(1 for b, t in zip(baseline, treated) if t > b)
        out.update(lost=lost, gained=gained, mcnemar_p=mcnemar_exact(lost, gained))
    return out


# ----------------------------------------------------------------------------------------------
# Local task configs (the harness's definitions, local data)


def require_harness():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise RefdirError(f"capability benchmarks need lm-evaluation-harness: {INSTALL_HINT}") from None
    return lm_eval


def _harness_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def check_data_dir(data_dir: Path, tasks: list[str]) -> None:
    """Every requested benchmark has its files under ``data_dir`` (checked before any model runs)."""
    if not data_dir.is_dir():
        raise RefdirError(f"--data-dir {data_dir} is not a folder")
    for t in tasks:
        if t not in BENCHMARKS:
            raise RefdirError(
                f"--data-dir has no local form of task '{t}'; local tasks: {', '.join(BENCHMARKS)}"
            )
        missing = [f for f in BENCHMARKS[t].files if not (data_dir / f).exists()]
        if missing:
            raise RefdirError(f"--data-dir {data_dir} lacks {t}'s files: {', '.join(missing)}")
        if t == "mmlu" and not any((data_dir / "mmlu/data/test").glob("*_test.csv")):
            raise RefdirError(f"--data-dir {data_dir}: mmlu/data/test holds no <subject>_test.csv files")


def _yaml(obj: dict) -> str:
    """Task YAML: JSON is YAML, except the harness's ``!function`` tags, which stay bare."""
    import json

    lines = []
    for k, v in obj.items():
        if isinstance(v, str) and v.startswith("!function "):
            lines.append(f"{k}: {v}")
        else:
            lines.append(f"{k}: {json.dumps(v)}")
    return "\n".join(lines) + "\n"


def write_local_tasks(data_dir: Path, out_dir: Path, tasks: list[str]) -> dict[str, str]:
    """Write task YAMLs reading the paper's benchmarks from ``data_dir``; returns {task: local task name}.

    Each YAML ``include:``s the harness's own task file (absolute path: the harness resolves includes
    against the including file) and overrides only the dataset keys, plus the field mappings where the
    original files' schema differs from the hub's (MMLU's headerless CSVs, ARC's nested ``question``,
    the klosax HellaSwag file)."""
    src, data_dir = _harness_tasks_dir(), data_dir.resolve()
    names: dict[str, str] = {}

    def local(name: str, include: str, splits: dict[str, str], load: dict | None = None, **overrides) -> None:
        """A task that is the harness's ``include`` with its data read from ``splits`` {split: file}
        (``load``: more ``datasets.load_dataset`` options); its tags dropped, so no harness group runs it."""
        files = {k: str(data_dir / v) for k, v in splits.items()}
        cfg = {
            "include": str(src / include),
            "task": name,
            "tag": [],
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": files, **(load or {})},
        }
        cfg = {k: v for k, v in {**cfg, **overrides}.items() if v is not _OMIT}
        (out_dir / f"{name}.yaml").write_text(_yaml(cfg), encoding="utf-8")

    def helper(rel: str) -> None:  # a !function module lives beside the harness's file, not beside ours
        (out_dir / Path(rel).name).write_text((src / rel).read_text(), encoding="utf-8")

    for t in tasks:
        name = names[t] = f"refdir_{t}"
        if t == "mmlu":
            subjects = sorted(
                p.name[: -len("_test.csv")] for p in (data_dir / "mmlu/data/test").glob("*_test.csv")
            )
            for s in subjects:
                local(
                    f"{name}_{s}",
                    "mmlu/default/_default_template_yaml",
                    {"test": f"mmlu/data/test/{s}_test.csv", "dev": f"mmlu/data/dev/{s}_dev.csv"},
                    # headerless CSVs; "None"/"NA" answers stay text
                    {
                        "column_names": ["question", "A", "B", "C", "D", "answer"],
                        "keep_default_na": False,
                        "na_filter": False,
                    },
                    dataset_path="csv",
                    tag=_OMIT,
                    doc_to_text=MMLU_TEXT,
                    description=f"The following are multiple choice questions (with answers) about "
                    f"{s.replace('_', ' ')}.\n\n",
                    doc_to_target="{{['A','B','C','D'].index(answer.strip())}}",
                )
            group = {
                "group": name,
                "task": [f"{name}_{s}" for s in subjects],
                "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
                "metadata": {"version": 2},
            }
            (out_dir / f"{name}.yaml").write_text(_yaml(group), encoding="utf-8")
        elif t == "arc_challenge":
            local(
                name,
                "arc/arc_challenge.yaml",
                {
                    "train": "arc_challenge/ARC-Challenge-Train.jsonl",
                    "validation": "arc_challenge/ARC-Challenge-Dev.jsonl",
                    "test": "arc_challenge/ARC-Challenge-Test.jsonl",
                },
                doc_to_text="Question: {{question.stem}}\nAnswer:",
                doc_to_decontamination_query="Question: {{question.stem}}\nAnswer:",
                doc_to_choice="{{question.choices | map(attribute='text') | list}}",
                doc_to_target=ARC_TARGET,
            )
        elif t == "gsm8k":
            local(name, "gsm8k/gsm8k.yaml", {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"})
        elif t in ("truthfulqa_mc1", "truthfulqa_mc2"):
            local(name, f"truthfulqa/{t}.yaml", {"validation": "truthfulqa/truthfulqa_mc_v0.hf.jsonl"})
            helper("truthfulqa/utils.py")
        elif t == "winogrande":
            local(
                name,
                "winogrande/default.yaml",
                {"train": "winogrande/train_l.jsonl", "validation": "winogrande/dev.jsonl"},
                tag=_OMIT,
            )
            helper("winogrande/preprocess_winogrande.py")
        elif t == "hellaswag":
            local(
                name,
                "hellaswag/hellaswag.yaml",
                {"validation": "hellaswag/hellaswag_val_klosax.jsonl"},
                training_split=None,
                process_docs=None,
                doc_to_text="{{query}}",
                doc_to_choice="{{choices}}",
                doc_to_target="{{label}}",
            )
    return names


# ----------------------------------------------------------------------------------------------
# Running the harness on one condition


@dataclass
class TaskScores:
    """One task's per-item scores under one condition (items in the harness's doc order)."""

    task: str
    metric: str
    items: list[float]  # per item, in doc_id order (MMLU: subjects in order, then doc_id)
    seconds: float

    @property
    def score(self) -> float:
        return sum(self.items) / len(self.items) if self.items else float("nan")


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


def task_manager(include_path: Path | None):
    """The harness's task index (its own tasks plus refdir's local YAMLs); built once, it takes seconds."""
    require_harness()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(include_path) if include_path else None)


def run_tasks(
    model,
    tokenizer,
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

    lm = _harness_lm(HFLM, model, tokenizer, batch_size, gen_rows or batch_size)
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


def _harness_lm(hflm, model, tokenizer, rows: int, gen_rows: int):
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
                old, self.batch_size_per_gpu = self.batch_size_per_gpu, gen_rows
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

    from refdir.core.forward import end_token_ids, greedy_generate, split_prefix
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


# ----------------------------------------------------------------------------------------------
# Both conditions


def parse_tasks(text: str | list[str] | None) -> list[str]:
    """``T1,T2,...`` (harness names) or ``paper`` (the paper's six) as a list."""
    items = text if isinstance(text, list) else (text or "").split(",")
    names: list[str] = []
    for t in (x.strip() for x in items):
        for n in PAPER_TASKS if t == "paper" else [t] if t else []:
            if n not in names:
                names.append(n)
    if not names:
        raise RefdirError("--tasks is empty (e.g. mmlu,arc_challenge or 'paper' for the paper's six)")
    return names


@dataclass
class TaskPlan:
    """What to run: {reported name: harness task}, the harness's task index, and the settings."""

    names: dict[str, str]
    tm: object
    settings: dict

    def key(self) -> dict:
        return {k: self.settings[k] for k in ("tasks", "data_dir", "limit", "num_fewshot", "max_gen_toks")}


@contextlib.contextmanager
def plan_tasks(
    tasks: str | list[str],
    data_dir: str | Path | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    max_gen_toks: int | None = None,
) -> Iterator[TaskPlan]:
    """Check the harness, the tasks and the local files, and write the local task YAMLs (in a temporary
    folder that lives as long as the plan) - everything that can fail before a model is loaded."""
    lm_eval = require_harness()
    names = parse_tasks(tasks)
    if data_dir is not None:  # the harness reads the local copies; nothing may reach for the hub
        check_data_dir(Path(data_dir), names)
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="refdir-tasks-") as tmp:
        mapping = write_local_tasks(Path(data_dir), Path(tmp), names) if data_dir else {n: n for n in names}
        tm = task_manager(Path(tmp) if data_dir else None)
        unknown = [n for n, h in mapping.items() if h not in tm.all_tasks]
        if unknown:
            raise RefdirError(
                f"unknown task '{unknown[0]}': not a task or group of lm-eval {lm_eval.__version__} "
                "('lm-eval ls tasks' lists them)"
            )
        yield TaskPlan(
            mapping,
            tm,
            {
                "tasks": names,
                "data_dir": str(Path(data_dir).resolve()) if data_dir else None,
                "limit": limit,
                "num_fewshot": num_fewshot,
                "max_gen_toks": max_gen_toks,
                "chat_template": False,
                "harness": f"lm-eval {lm_eval.__version__}",
                "interval": "paired: mean of per-item differences +- 1.96 sd/sqrt(n)",
            },
        )


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


def scores_to_json(scores: dict[str, TaskScores]) -> dict:
    return {
        n: {"metric": s.metric, "items": s.items, "seconds": round(s.seconds, 2)} for n, s in scores.items()
    }


def scores_from_json(d: dict) -> dict[str, TaskScores]:
    return {n: TaskScores(n, v["metric"], [float(x) for x in v["items"]], v["seconds"]) for n, v in d.items()}


def compare(baseline: dict[str, TaskScores], treated: dict[str, TaskScores] | None) -> list[dict]:
    """One row per task: each condition's score and stderr, and the paired Δ with its 95% interval."""
    rows = []
    for name, b in baseline.items():
        row = {
            "task": name,
            "metric": b.metric,
            "n": len(b.items),
            "baseline": b.score,
            "baseline_stderr": mean_stderr(b.items),
            "baseline_seconds": round(b.seconds, 1),
        }
        if treated is not None:
            o = treated[name]
            row.update(
                {
                    "orthogonalized": o.score,
                    "orthogonalized_stderr": mean_stderr(o.items),
                    "orthogonalized_seconds": round(o.seconds, 1),
                    **paired_delta(b.items, o.items),
                }
            )
        rows.append(row)
    return rows


def result_json(
    model: str | None,
    direction,
    plan: TaskPlan,
    base: dict[str, TaskScores],
    treated: dict[str, TaskScores] | None,
    batches: dict,
) -> dict:
    """The output: ``{"model", "direction", "settings", "results": [...], "per_item": {...}}``."""
    return {
        "model": model,
        "direction": direction.meta() if direction is not None else None,
        "settings": {**plan.settings, **batches},
        "results": compare(base, treated),
        "per_item": {
            n: {"baseline": base[n].items, **({"orthogonalized": treated[n].items} if treated else {})}
            for n in base
        },
    }


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


def table_rows(res: dict) -> list[tuple[str, str, str, str]]:
    """(task, n, orthogonalized, baseline (Δ ± CI)) in points, the paper's Table 3 layout."""
    rows = []
    for r in res["results"]:
        if "orthogonalized" in r:
            half = (r["delta_ci95"][1] - r["delta_ci95"][0]) / 2
            rows.append(
                (
                    r["task"],
                    str(r["n"]),
                    f"{100 * r['orthogonalized']:.1f}",
                    f"{100 * r['baseline']:.1f} ({100 * r['delta']:+.1f} ± {100 * half:.1f}"
                    + (f"; {changed_items(r)})" if changed_items(r) else ")"),
                )
            )
        else:
            rows.append(
                (r["task"], str(r["n"]), "-", f"{100 * r['baseline']:.1f} ± {196 * r['baseline_stderr']:.1f}")
                # one condition: its own 95% interval
            )
    return rows


def print_table(res: dict) -> None:
    print(f"{'task':16} {'n':>6} {'ortho':>7}  baseline (delta +- 95% CI, points)")
    for task, n, o, b in table_rows(res):
        print(f"{task:16} {n:>6} {o:>7}  {b}")
