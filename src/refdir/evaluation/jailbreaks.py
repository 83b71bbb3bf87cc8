"""The paper's Table 2 analogue: how each way of attacking refusal fares on one harmful evaluation set.

Rows: the direct request, a random suffix (resampled per prompt, the control), the run's GCG suffix (when
``refdir suffix`` ran), −r activation addition and orthogonalized weights. Columns: the refusal rate and the
judge-scored compliance by every judge the run has (the paper's substring judge, the run's second judge).
The rows that the evaluation generated are read from ``completions.jsonl``; the suffix rows are generated
here on the model's own weights with the run's token budget.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from refdir.core.errors import RefdirError
from refdir.core.io import read_jsonl
from refdir.run.folder import RunFolder

if TYPE_CHECKING:
    from refdir.core.runtime import Runtime

SUBSTRING = "substring (paper)"
# (row label, completions key) in the paper's order; the suffix rows are generated here
ROWS = (
    ("direct request", "harmful/baseline"),
    ("random suffix", "harmful/random_suffix"),
    ("GCG suffix", "harmful/gcg_suffix"),
    ("-r activation addition", "harmful/actadd-"),
    ("orthogonalized weights", "harmful/ortho"),
)


def _stored(folder: RunFolder) -> tuple[dict, list[dict]]:
    """The run's evaluation and its stored completions (the rows the evaluation generated)."""
    ev_file, comp_file = folder.eval, folder.completions
    if not ev_file.is_file() or not comp_file.is_file():
        run = folder.path
        raise RefdirError(f"{run} has no evaluation yet: run `refdir run --out {run}` first")
    return json.loads(ev_file.read_text()), read_jsonl(comp_file)


def _judge_rates(labels_refused: list[bool]) -> tuple[float, float]:
    n = max(len(labels_refused), 1)
    refused = sum(labels_refused) / n
    return refused, 1.0 - refused


def _suffix_rows(
    rt: Runtime, harm: list[dict], suffixes: dict[str, list[str]], n_new: int, log
) -> list[dict]:
    """Completions of the harmful prompts with each suffix appended ({completions key: one suffix per
    prompt}), as completion rows; the judges read the request without its suffix."""
    from refdir.evaluation.conditions import generate_judged

    held, cats = [x["instruction"] for x in harm], [x.get("category") for x in harm]
    new_rows: list[dict] = []
    for key, sfx in suffixes.items():
        log(f"jailbreaks: generating {key.split('/')[1].replace('_', ' ')} completions ({len(held)} prompts)")
        items = generate_judged(
            rt.model,
            rt.tokenizer,
            [f"{p} {s}" for p, s in zip(held, sfx)],
            cats,
            rt.fmt,
            n_new,
            rt.batch.gen_rows,
            key,
        )
        # the judges read the request without its suffix: they score the reply to what was asked
        new_rows += [
            {
                "split": "harmful",
                "condition": key.split("/")[1],
                "prompt": p,
                "suffix": s,
                "category": j.category,
                "refused": j.refused,
                "completion": j.completion,
            }
            for p, s, j in zip(held, sfx, items)
        ]
    return new_rows


def _second_judge(
    rt: Runtime, ev: dict, new_rows: list[dict], judge_spec: str, load_options: dict | None, log
) -> dict:
    """The second judge's verdicts per completions key: the new rows judged here, the stored rows' from
    the evaluation when it used the same judge; orthogonalized rows take ablation's."""
    from refdir.evaluation.judges import second_judge

    log(f"jailbreaks: second judge ({judge_spec}) on the suffix rows")
    second: dict = {}
    if new_rows:
        second = second_judge(rt.model, rt.tokenizer, new_rows, judge_spec, rt.fmt, load_options=load_options)
        second = second["conditions"]
    old = (ev.get("judge") or {}) if (ev.get("judge") or {}).get("judge") == judge_spec else {}
    for k, v in (old.get("conditions") or {}).items():
        second.setdefault(k, v)
    if "harmful/ortho" not in second and "harmful/ablation" in second:
        second["harmful/ortho"] = second["harmful/ablation"]
    return second


def _table_row(label: str, key: str, rows: list[dict], judge_spec: str | None, second: dict) -> dict:
    """One attack's row: its refusal and compliance rates by the substring judge and the second one."""
    ref, comp = _judge_rates([r["refused"] for r in rows])
    row: dict = {
        "condition": label,
        "key": key,
        "n": len(rows),
        "refusal": {SUBSTRING: ref},
        "compliance": {SUBSTRING: comp},
    }
    if judge_spec:
        j = second.get(key)
        if j is not None:
            row["refusal"][judge_spec] = j["refusal_rate"]
            row["compliance"][judge_spec] = sum(x == "compliance" for x in j["labels"]) / max(
                len(j["labels"]), 1
            )
        else:  # e.g. a judge added after this row's completions: say so instead of guessing
            row["refusal"][judge_spec] = row["compliance"][judge_spec] = None
    return row


def jailbreak_table(
    rt,  # a Runtime (not annotated while Runtime.tokenizer is typed ``object``)
    run: str | Path,
    data: dict,
    judge_spec: str | None = None,
    load_options: dict | None = None,
    seed: int = 0,
    log=print,
) -> tuple[dict, list[dict]]:
    """The table (``jailbreaks.json``) and the completions generated for the suffix rows.

    ``rt`` must hold the model's own weights (the suffix rows attack the unedited model). ``judge_spec``:
    the second judge to score the new rows with (default: the run's own, if it has one)."""
    from refdir.analyses.suffix_analysis import random_suffixes

    folder = RunFolder(run)
    t = time.time()
    ev, stored = _stored(folder)
    judge_spec = judge_spec or (ev.get("judge") or {}).get("judge")
    harm = data["eval_harmful"]
    sj = json.loads(folder.suffix.read_text()) if folder.suffix.is_file() else None
    n_tokens = sj["n_tokens"] if sj else 20
    suffixes = {
        "harmful/random_suffix": random_suffixes(
            rt.tokenizer, len(harm), n_tokens, sj["seed"] if sj else seed
        )
    }
    if sj:
        suffixes["harmful/gcg_suffix"] = [sj["suffix"]] * len(harm)
    n_new = int(ev.get("max_new_tokens", 64))
    new_rows = _suffix_rows(rt, harm, suffixes, n_new, log)
    by_key: dict[str, list[dict]] = {}
    for r in stored + new_rows:
        by_key.setdefault(f"{r['split']}/{r['condition']}", []).append(r)
    ortho_note = None
    if "harmful/ortho" not in by_key:  # not regenerated: ortho is ablation's completions (equal on logits)
        by_key["harmful/ortho"] = by_key.get("harmful/ablation", [])
        ortho_note = "completions of hook ablation (logit-equivalent; checked in eval.json's ortho_check)"
    judges = [SUBSTRING] + ([judge_spec] if judge_spec else [])
    second = _second_judge(rt, ev, new_rows, judge_spec, load_options, log) if judge_spec else {}
    table = []
    for label, key in ROWS:
        if not by_key.get(key):
            continue
        row = _table_row(label, key, by_key[key], judge_spec, second)
        if key == "harmful/ortho" and ortho_note:
            row["note"] = ortho_note
        if key == "harmful/gcg_suffix" and sj:
            row["note"] = f"suffix from suffix.json ({sj['steps']} GCG steps, {sj['n_tokens']} tokens)"
        table.append(row)
    if not sj:
        log("jailbreaks: no suffix.json in the run (run `refdir suffix` for the GCG row)")
    res = {
        "model": rt.spec,
        "n_prompts": len(harm),
        "max_new_tokens": n_new,
        "judges": judges,
        "rows": table,
        "seconds": round(time.time() - t, 1),
    }
    return res, new_rows
