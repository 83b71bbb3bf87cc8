"""Which capability tasks to run and where their data comes from: task planning and local task YAMLs.

With ``data_dir`` the paper's six benchmarks are read from local copies in their original formats (the
layout of ``../shared/benchmarks/``): refdir writes task YAMLs that ``include:`` the harness's own task
definitions (prompts, metrics, filters, ``!function`` helpers) and override only where the data comes
from. Everything here runs before a model is loaded, so a bad task or a missing file fails at once. The
harness (PyPI ``lm-eval``) is imported lazily, inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
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
OMIT = object()  # a key left out of a local task YAML
# the harness's MMLU prompt over the CSV's columns; ARC's gold index from the original nested choices
MMLU_TEXT = "{{question.strip()}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\nAnswer:"
ARC_TARGET = "{{(question.choices | map(attribute='label') | list).index(answerKey)}}"
PAPER_TASKS = ("mmlu", "arc_challenge", "gsm8k", "truthfulqa_mc2", "winogrande", "hellaswag")
# the harness metric each hub task reports when refdir has no entry for it: its first metric, unfiltered
DEFAULT_METRICS = ("acc_norm", "acc", "exact_match", "mc2")


def require_harness():
    """The ``lm_eval`` module, or the one error that says how to install it."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise RefdirError(f"capability benchmarks need lm-evaluation-harness: {INSTALL_HINT}") from None
    return lm_eval


def harness_tasks_dir() -> Path:
    """The folder of the installed harness's task definitions (local YAMLs ``include:`` from it)."""
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
    lines = []
    for k, v in obj.items():
        if isinstance(v, str) and v.startswith("!function "):
            lines.append(f"{k}: {v}")
        else:
            lines.append(f"{k}: {json.dumps(v)}")
    return "\n".join(lines) + "\n"


@dataclass
class LocalTaskWriter:
    """Writes task YAMLs into ``out_dir`` that are the harness's own task files with local data.

    ``src``: the harness's task folder; ``data_dir``: the local copies (absolute: the harness reads the
    paths as written)."""

    src: Path
    data_dir: Path
    out_dir: Path

    def local(self, name: str, include: str, splits: dict[str, str], load: dict | None = None, **overrides):
        """A task that is the harness's ``include`` with its data read from ``splits`` {split: file}
        (``load``: more ``datasets.load_dataset`` options); its tags dropped, so no harness group runs it."""
        files = {k: str(self.data_dir / v) for k, v in splits.items()}
        cfg: dict[str, object] = {
            "include": str(self.src / include),
            "task": name,
            "tag": [],
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": files, **(load or {})},
        }
        cfg = {k: v for k, v in {**cfg, **overrides}.items() if v is not OMIT}
        (self.out_dir / f"{name}.yaml").write_text(_yaml(cfg), encoding="utf-8")

    def helper(self, rel: str) -> None:
        """Copy a ``!function`` module: it must live beside the including file, not the harness's."""
        (self.out_dir / Path(rel).name).write_text((self.src / rel).read_text(), encoding="utf-8")

    def mmlu(self, name: str) -> None:
        """One task per subject from the headerless CSVs, and a group pooling them by size."""
        tests = (self.data_dir / "mmlu/data/test").glob("*_test.csv")
        subjects = sorted(p.name[: -len("_test.csv")] for p in tests)
        for s in subjects:
            self.local(
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
                tag=OMIT,
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
        (self.out_dir / f"{name}.yaml").write_text(_yaml(group), encoding="utf-8")

    def write(self, t: str, name: str) -> None:
        """The local form of benchmark ``t`` under the task name ``name`` (nothing for other tasks)."""
        if t == "mmlu":
            self.mmlu(name)
        elif t == "arc_challenge":
            self.local(
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
            self.local(name, "gsm8k/gsm8k.yaml", {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"})
        elif t in ("truthfulqa_mc1", "truthfulqa_mc2"):
            self.local(name, f"truthfulqa/{t}.yaml", {"validation": "truthfulqa/truthfulqa_mc_v0.hf.jsonl"})
            self.helper("truthfulqa/utils.py")
        elif t == "winogrande":
            splits = {"train": "winogrande/train_l.jsonl", "validation": "winogrande/dev.jsonl"}
            self.local(name, "winogrande/default.yaml", splits, tag=OMIT)
            self.helper("winogrande/preprocess_winogrande.py")
        elif t == "hellaswag":
            self.local(
                name,
                "hellaswag/hellaswag.yaml",
                {"validation": "hellaswag/hellaswag_val_klosax.jsonl"},
                training_split=None,
                process_docs=None,
                doc_to_text="{{query}}",
                doc_to_choice="{{choices}}",
                doc_to_target="{{label}}",
            )


def write_local_tasks(data_dir: Path, out_dir: Path, tasks: list[str]) -> dict[str, str]:
    """Write task YAMLs reading the paper's benchmarks from ``data_dir``; returns {task: local task name}.

    Each YAML ``include:``s the harness's own task file (absolute path: the harness resolves includes
    against the including file) and overrides only the dataset keys, plus the field mappings where the
    original files' schema differs from the hub's (MMLU's headerless CSVs, ARC's nested ``question``,
    the klosax HellaSwag file)."""
    writer = LocalTaskWriter(harness_tasks_dir(), data_dir.resolve(), out_dir)
    names: dict[str, str] = {}
    for t in tasks:
        names[t] = f"refdir_{t}"
        writer.write(t, names[t])
    return names


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


def task_manager(include_path: Path | None):
    """The harness's task index (its own tasks plus refdir's local YAMLs); built once, it takes seconds."""
    require_harness()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(include_path) if include_path else None)
