"""The run's evaluation of its direction (paper §3-4, Table 7): refusal under each condition, KL and CE.

Two steps, so that no caller's model is edited behind its back:

* :func:`evaluate_conditions` — hooks only: the five generated conditions (harmful baseline / ablation /
  −r, harmless baseline / +r), the optional second judge, KL and CE on harmless prompts and text. The
  model's weights are untouched.
* :func:`check_orthogonalized` — orthogonalizes the weights of a model the caller hands over for that
  purpose (the run's own), checks them against ablation on logits and, with ``--preset paper``,
  regenerates and re-scores the orthogonalized condition.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from refdir.core.adapter import get_adapter
from refdir.core.models import release_memory
from refdir.core.runtime import Runtime
from refdir.core.templates import PromptFormat
from refdir.evaluation.conditions import (
    GenJob,
    Judged,
    completion_rows,
    condition,
    condition_factory,
    generate_conditions,
    generate_judged,
    kl_and_ce,
    per_category,
    refusal_rate,
)
from refdir.evaluation.judges import second_judge
from refdir.evaluation.verdicts import needs_model, resolve_judge
from refdir.evaluation.xstest import (
    attach_judge,
    new_block,
    ortho_as_ablation,
    record,
    xstest_jobs,
    xstest_prompts,
)
from refdir.method.directions import Direction
from refdir.method.interventions import orthogonalize_weights
from refdir.method.refusal import REFUSAL_PHRASES, last_logits
from refdir.run.settings import RunConfig

# all five conditions in shared batches, a refusing condition next to an answering one (rows that refuse
# leave the batch after a dozen tokens; the answers keep it wide)
CONDITIONS = (
    ("harmful", "baseline"),
    ("harmful", "ablation"),
    ("harmless", "actadd+"),
    ("harmful", "actadd-"),
    ("harmless", "baseline"),
)
REPORT_ORDER = (
    ("harmful", "baseline"),
    ("harmful", "ablation"),
    ("harmful", "actadd-"),
    ("harmless", "baseline"),
    ("harmless", "actadd+"),
)


@dataclass
class Evaluation:
    """The evaluate stage's artifact: ``ev`` is ``eval.json``, ``rows`` are ``completions.jsonl``."""

    ev: dict
    rows: list[dict] = field(default_factory=list)

    def record(self, cond: str, split: str, items: list[Judged]) -> None:
        """Add one condition's refusal rate and its completions."""
        self.ev.setdefault("refusal", {}).setdefault(split, {})[cond] = {
            "refusal_rate": refusal_rate(items),
            "n": len(items),
            "per_category": per_category(items),
        }
        self.rows.extend(completion_rows(split, cond, items))


def instructions(items: list[dict]) -> list[str]:
    """The instruction texts of prompts.json rows."""
    return [x["instruction"] for x in items]


def judge_load(cfg: RunConfig) -> dict:
    """A classifier or probe judge's model goes where the run's model computes, in its dtype (a device
    map is the model's own)."""
    return {"device": cfg.device, "dtype": cfg.dtype, "trust_remote_code": cfg.trust_remote_code}


def run_second_judge(rt: Runtime, rows: list[dict], cfg: RunConfig, log=lambda message: None) -> dict | None:
    """The run's second judge on its completions (None: no second judge). "auto" is the probe judge when
    it can run here; when it cannot, the log says why and the run goes on with the substring judge alone.
    The block records the judge that ran and, when it differs, the one asked for."""
    spec, why = resolve_judge(cfg.judge)
    if spec is None:
        if why:
            log(f"evaluate: second judge: off ({why})")
        return None
    log(f"evaluate: second judge ({spec})")
    block = second_judge(
        rt.model, rt.tokenizer, rows, spec, rt.fmt, load_options=judge_load(cfg), judge_model=cfg.judge_model
    )
    if cfg.judge != spec:
        block["requested"] = cfg.judge
    if cfg.judge_model:
        block["judge_model"] = cfg.judge_model
    return block


def evaluate_conditions(
    rt: Runtime, direction: Direction, data: dict, cfg: RunConfig, log=lambda message: None
) -> Evaluation:
    """Refusal rates per condition and KL/CE on harmless prompts, through hooks: weights untouched."""
    model, tok, fmt = rt.model, rt.tokenizer, rt.fmt
    harm, harmless = data["eval_harmful"], data["eval_harmless"]
    prompts = {"harmful": instructions(harm), "harmless": instructions(harmless)}
    cats = {"harmful": [x.get("category") for x in harm], "harmless": [x.get("category") for x in harmless]}
    out = Evaluation({"direction": direction.meta(), "refusal": {}})
    jobs = [GenJob(f"{s}/{c}", c, prompts[s], cats[s]) for s, c in CONDITIONS]
    xstest = xstest_prompts(cfg.overrefusal_n)  # over-refusal: XSTest's sets in the same batches
    extra = xstest_jobs(xstest)
    judged = generate_conditions(
        model, tok, jobs + extra, direction, fmt, cfg.max_new_tokens, rt.batch.gen_rows
    )
    for split, cond in REPORT_ORDER:
        out.record(cond, split, judged[f"{split}/{cond}"])
    if xstest:
        out.ev["overrefusal"] = new_block(xstest, cfg.overrefusal_n)
        for job in extra:
            split = job.name.split("/")[0]
            record(out.ev["overrefusal"], split, job.condition, judged[job.name])
            out.rows += completion_rows(split, job.condition, judged[job.name])
    out.ev["judge"] = run_second_judge(rt, out.rows, cfg, log)
    attach_judge(out.ev)
    log("evaluate: KL and cross-entropy on harmless prompts and text")
    ctx = {c: condition_factory(model, c, direction) for c in ("baseline", "ablation", "actadd+")}
    # KL and CE on harmless prompts, teacher-forced on the model's own baseline completions
    base = _baseline_completions(out.rows)
    bs = rt.batch.prompt_rows
    out.ev["kl_ce_harmless"] = kl_and_ce(
        model, tok, prompts["harmless"], base, fmt, ctx, n_tokens=16, batch_size=bs
    )
    # CE on harmless instruction + response text written by people (paper Table 7), first 64 tokens
    pairs = data.get("ce_text") or []
    ins, resp = [x["instruction"] for x in pairs], [x["response"] for x in pairs]
    out.ev["ce_harmless_text"] = (
        kl_and_ce(model, tok, ins, resp, fmt, ctx, n_tokens=64, batch_size=bs) if pairs else {}
    )
    out.ev["max_new_tokens"] = cfg.max_new_tokens
    out.ev["refusal_phrases"] = list(REFUSAL_PHRASES)
    return out


def _baseline_completions(rows: list[dict]) -> list[str]:
    return [r["completion"] for r in rows if r["split"] == "harmless" and r["condition"] == "baseline"]


def check_orthogonalized(
    owned: Runtime, direction: Direction, data: dict, cfg: RunConfig, out: Evaluation, log=lambda m: None
) -> None:
    """Orthogonalize ``owned.model``'s weights in place and add the orthogonalized condition to ``out``.

    ``owned`` must be a model the caller has handed over for editing (the run's own copy): its weights are
    orthogonalized (a second copy would double peak memory). Orthogonalized logits are checked against
    ablation on 16 harmful prompts; with ``regenerate_ortho`` the condition is regenerated and re-scored,
    otherwise it takes ablation's scores (logit-equivalent, checked).
    """
    model = owned.model
    hp = instructions(data["eval_harmful"])
    b = owned.encode(hp[:16])
    with condition(model, "ablation", direction):
        la = last_logits(model, b.input_ids, b.attention_mask)
    log("evaluate: orthogonalizing the weights, checked against ablation")
    release_memory()  # untying the unembedding allocates a vocab x d copy: not on top of freed buffers
    orthogonalize_weights(model, direction.vector, allow_approximate=True)
    lo = last_logits(model, b.input_ids, b.attention_mask)
    out.ev["ortho_check"] = {
        "max_abs_logit_diff_vs_ablation": float((la - lo).abs().max()),
        "n_prompts": b.input_ids.shape[0],
        "exact_by_construction": get_adapter(model).linear_writes,
    }
    if cfg.regenerate_ortho:
        _regenerate_ortho(owned, data, cfg, out)
    else:  # ortho ≡ ablation: its completions and scores are those of ablation (checked on logits above)
        same = "ablation (logit-equivalent)"
        ev = out.ev
        ev["refusal"]["harmful"]["ortho"] = {**ev["refusal"]["harmful"]["ablation"], "from": same}
        ev["kl_ce_harmless"]["ortho"] = {**ev["kl_ce_harmless"]["ablation"], "from": same}
        if ev["ce_harmless_text"]:
            ev["ce_harmless_text"]["ortho"] = {**ev["ce_harmless_text"]["ablation"], "from": same}
        if "overrefusal" in ev:
            ortho_as_ablation(ev["overrefusal"])


def _regenerate_ortho(owned: Runtime, data: dict, cfg: RunConfig, out: Evaluation) -> None:
    """``--preset paper``: generate the orthogonalized condition and score CE under the edited weights."""
    model, tok, fmt, bs = owned.model, owned.tokenizer, owned.fmt, owned.batch.prompt_rows
    first_new = len(out.rows)
    harm = data["eval_harmful"]
    hp, hcat = instructions(harm), [x.get("category") for x in harm]
    n_new = cfg.max_new_tokens
    out.record(
        "ortho",
        "harmful",
        generate_judged(model, tok, hp, hcat, fmt, n_new, owned.batch.gen_rows, "harmful/ortho"),
    )
    for split, ps in xstest_prompts(cfg.overrefusal_n).items():
        items = generate_judged(
            model,
            tok,
            [p.instruction for p in ps],
            [p.category for p in ps],
            fmt,
            n_new,
            owned.batch.gen_rows,
            f"{split}/ortho",
        )
        record(out.ev["overrefusal"], split, "ortho", items)
        out.rows += completion_rows(split, "ortho", items)
    _judge_regenerated(out, out.rows[first_new:], cfg, fmt)
    # the baseline is gone from memory: CE of the baseline completions under the orthogonalized weights
    plain = {"baseline": contextlib.nullcontext}
    lp = instructions(data["eval_harmless"])
    ce = kl_and_ce(model, tok, lp, _baseline_completions(out.rows), fmt, plain, 16, bs)["baseline"]
    klce = out.ev["kl_ce_harmless"]
    klce["ortho"] = {
        **klce["ablation"],
        "ce": ce["ce"],
        "ce_tokens": ce["ce_tokens"],
        "kl_from": "ablation (logit-equivalent; the baseline weights are gone)",
    }
    pairs = data.get("ce_text") or []
    if pairs:
        ins, resp = [x["instruction"] for x in pairs], [x["response"] for x in pairs]
        ce_t = kl_and_ce(model, tok, ins, resp, fmt, plain, 64, bs)["baseline"]
        text = out.ev["ce_harmless_text"]
        text["ortho"] = {**text["ablation"], "ce": ce_t["ce"], "kl_from": "ablation (logit-equivalent)"}


def _judge_regenerated(out: Evaluation, rows: list[dict], cfg: RunConfig, fmt: PromptFormat) -> None:
    """The run's second judge on the regenerated orthogonalized rows (it ran before they existed).

    A judge that reads the run's own model (``self``) would now read the orthogonalized weights: it is
    skipped and the block says so. The others need no model of the run's: a probe loads its judge
    model afresh from disk (never the edited copy), rules and classifiers read only the text."""
    block = out.ev.get("judge")
    if not block or not rows:
        return
    if needs_model(block["judge"]):
        block["ortho"] = "not judged: the self judge would read the orthogonalized weights"
        return
    spec, load = block["judge"], judge_load(cfg)
    extra = second_judge(None, None, rows, spec, fmt, load_options=load, judge_model=cfg.judge_model)
    block["conditions"].update(extra["conditions"])
    attach_judge(out.ev)
