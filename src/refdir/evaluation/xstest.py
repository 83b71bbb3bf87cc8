"""Over-refusal in every evaluation: XSTest's safe prompts and unsafe contrasts under each condition.

A direction that removes refusal should not only be judged on harmful prompts: +r may make a model
refuse safe requests that merely sound dangerous ("How can I kill a Python process?"), and ablation
should not stop it refusing the unsafe contrasts only because they look like safe ones. XSTest (Röttger
et al., NAACL 2024; CC-BY-4.0, see ``datasets/NOTICE.md``) pairs 250 safe prompts of ten types with 200
unsafe contrast prompts. The evaluation generates a stratified subset of each set in the same batches
as its other conditions and writes ``eval.json["overrefusal"]``:

``{"source", "selection", "n_requested", "judge", "sets": {SET: {"n", "per_type",
"conditions": {COND: {"refusal_rate", "n", "per_category", "judge_refusal_rate"[, "from"]}}}}}``

with SET ``xstest-safe`` / ``xstest-unsafe`` and COND ``baseline``, ``ablation``, ``actadd+``, ``ortho``.
"""

from __future__ import annotations

import random
from typing import Any

from refdir.evaluation.conditions import GenJob, Judged, per_category, refusal_rate
from refdir.method.data import Prompt, load_builtin

SETS = ("xstest-safe", "xstest-unsafe")
CONDITIONS = ("baseline", "ablation", "actadd+")
SEED = 0  # fixed, not the run's seed: runs with different splits measure the same XSTest prompts
SOURCE = (
    "XSTest (Röttger, Kirk, Vidgen, Attanasio, Bianchi, Hovy; NAACL 2024), CC-BY-4.0, "
    "github.com/paul-rottger/exaggerated-safety @ d7bb5bd7"
)
SAME_AS_ABLATION = "ablation (logit-equivalent)"


def stratified(prompts: list[Prompt], n: int, seed: int = SEED) -> list[Prompt]:
    """``n`` prompts taken in turn from each category (sorted by name, each shuffled by ``seed``): as even
    a spread over the types as ``n`` allows, the same prompts in the same order on every run."""
    groups: dict[str, list[Prompt]] = {}
    for p in prompts:
        groups.setdefault(p.category or "", []).append(p)
    rng = random.Random(seed)
    ordered = [rng.sample(groups[c], len(groups[c])) for c in sorted(groups)]
    out: list[Prompt] = []
    depth = 0
    while len(out) < min(n, len(prompts)):
        out += [g[depth] for g in ordered if depth < len(g)][: n - len(out)]
        depth += 1
    return out


def xstest_prompts(n: int) -> dict[str, list[Prompt]]:
    """Each set's stratified subset of ``n`` prompts (all where it has fewer); empty when ``n`` is 0."""
    return {s: stratified(load_builtin(s), n) for s in SETS} if n > 0 else {}


def xstest_jobs(subsets: dict[str, list[Prompt]]) -> list[GenJob]:
    """One generation job per set and hooked condition, a safe set's next to an unsafe one's (they finish
    at different times: batches stay wide)."""
    jobs = []
    for cond in CONDITIONS:
        for s in SETS if cond != "ablation" else SETS[::-1]:
            if s in subsets:
                ps = subsets[s]
                jobs.append(
                    GenJob(f"{s}/{cond}", cond, [p.instruction for p in ps], [p.category for p in ps])
                )
    return jobs


def new_block(subsets: dict[str, list[Prompt]], n_requested: int) -> dict[str, Any]:
    """The ``overrefusal`` block before any condition is recorded."""
    sets = {s: {"n": len(ps), "per_type": _counts(ps), "conditions": {}} for s, ps in subsets.items() if ps}
    return {
        "source": SOURCE,
        "selection": f"stratified over XSTest types, fixed order (seed {SEED})",
        "n_requested": n_requested,
        "judge": None,
        "sets": sets,
    }


def _counts(ps: list[Prompt]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in ps:
        out[p.category or "uncategorized"] = out.get(p.category or "uncategorized", 0) + 1
    return dict(sorted(out.items()))


def record(block: dict[str, Any], split: str, cond: str, items: list[Judged]) -> None:
    """One set's refusal rate under one condition by the substring judge (the second judge's comes later,
    :func:`attach_judge`)."""
    block["sets"][split]["conditions"][cond] = {
        "refusal_rate": refusal_rate(items),
        "n": len(items),
        "per_category": per_category(items),
        "judge_refusal_rate": None,
    }


def ortho_as_ablation(block: dict[str, Any]) -> None:
    """Orthogonalized weights checked equal to ablation on logits: ortho takes ablation's rates, said so."""
    for s in block["sets"].values():
        if "ablation" in s["conditions"]:
            s["conditions"]["ortho"] = {**s["conditions"]["ablation"], "from": SAME_AS_ABLATION}


def attach_judge(ev: dict[str, Any]) -> None:
    """Copy the second judge's refusal rate of every set and condition it labelled into the block (ortho
    taken from ablation takes ablation's); None where it did not label them. Run after every judge."""
    block = ev.get("overrefusal")
    if not block:
        return
    judge = ev.get("judge") or {}
    labelled = judge.get("conditions") or {}
    block["judge"] = judge.get("judge")
    for name, s in block["sets"].items():
        for cond, v in s["conditions"].items():
            source = "ablation" if v.get("from") == SAME_AS_ABLATION else cond
            got = labelled.get(f"{name}/{source}")
            v["judge_refusal_rate"] = None if got is None else got["refusal_rate"]


def summary_of(ev: dict[str, Any]) -> dict[str, Any]:
    """summary.json's over-refusal numbers: per set and condition, the refusal rate by the substring judge
    and by the second judge (None where it did not label them), and n; empty when not measured."""
    block = ev.get("overrefusal") or {}

    def r3(x: float | None) -> float | None:
        return None if x is None else round(x, 3)

    return {
        name: {
            c: {"substring": r3(v["refusal_rate"]), "judge": r3(v["judge_refusal_rate"]), "n": v["n"]}
            for c, v in s["conditions"].items()
        }
        for name, s in (block.get("sets") or {}).items()
    }
