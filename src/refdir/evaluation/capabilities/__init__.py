"""Capability benchmarks through lm-evaluation-harness, baseline vs orthogonalized, with paired deltas.

The paper's claim is two-sided: orthogonalization removes refusal *and* leaves capabilities intact (its
Tables 3 and 6: MMLU, ARC, GSM8K, TruthfulQA, WinoGrande, HellaSwag, no chat template). Both conditions run
on the same items, so each task's change is reported with a *paired* interval over per-item differences.

Modules, in the order a run uses them:

* :mod:`.tasks` — which tasks, the harness check, local task YAMLs over ``--data-dir`` (before any model);
* :mod:`.harness` — refdir's forward passes under the harness's requests; one condition's run;
* :mod:`.results` — per-item scores as JSON, the paired comparison and the paper's table;
* :mod:`.stats` — paired deltas, McNemar's exact test (torch-free).

Every module imports without lm-eval installed: the harness is imported inside the functions that need it.
"""

from refdir.evaluation.capabilities.harness import (
    CPU_HARNESS_GEN_ROWS,
    CPU_HARNESS_ROWS,
    evaluate_capabilities,
    harness_batches,
    harness_gen_rows,
    harness_lm,
    harness_rows,
    run_condition,
    run_tasks,
)
from refdir.evaluation.capabilities.results import (
    TaskScores,
    compare,
    print_table,
    result_json,
    scores_from_json,
    scores_to_json,
    table_rows,
)
from refdir.evaluation.capabilities.stats import changed_items, mcnemar_exact, mean_stderr, paired_delta
from refdir.evaluation.capabilities.tasks import (
    ARC_TARGET,
    BENCHMARKS,
    DEFAULT_METRICS,
    INSTALL_HINT,
    MMLU_TEXT,
    PAPER_TASKS,
    Benchmark,
    LocalTaskWriter,
    TaskPlan,
    check_data_dir,
    parse_tasks,
    plan_tasks,
    require_harness,
    task_manager,
    write_local_tasks,
)

__all__ = [
    "ARC_TARGET",
    "BENCHMARKS",
    "CPU_HARNESS_GEN_ROWS",
    "CPU_HARNESS_ROWS",
    "DEFAULT_METRICS",
    "INSTALL_HINT",
    "MMLU_TEXT",
    "PAPER_TASKS",
    "Benchmark",
    "LocalTaskWriter",
    "TaskPlan",
    "TaskScores",
    "changed_items",
    "check_data_dir",
    "compare",
    "evaluate_capabilities",
    "harness_batches",
    "harness_gen_rows",
    "harness_lm",
    "harness_rows",
    "mcnemar_exact",
    "mean_stderr",
    "paired_delta",
    "parse_tasks",
    "plan_tasks",
    "print_table",
    "require_harness",
    "result_json",
    "run_condition",
    "run_tasks",
    "scores_from_json",
    "scores_to_json",
    "table_rows",
    "task_manager",
    "write_local_tasks",
]
