"""``refdir run``: the stage table over the run folder.

prompts (:mod:`refdir.method.screen`) -> activations (:mod:`refdir.method.activations`) -> candidates
(:mod:`refdir.method.directions`) -> direction (:mod:`refdir.method.selection`) -> evaluations
(:mod:`refdir.evaluation.conditions`, :mod:`refdir.evaluation.judges`) -> report
(:mod:`refdir.outputs.report`); settings from :mod:`refdir.run.settings`.

Each stage writes its artifact into the run folder (atomically) together with the hash of its
inputs in ``stages.json``. A stage whose inputs are unchanged is reused; one whose inputs changed
(model, data, sizes, seed, prompt format, refdir version, an upstream artifact) is recomputed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
import shutil
import time
from pathlib import Path

from refdir import __version__
from refdir.core.adapter import get_adapter
from refdir.core.errors import RefdirError
from refdir.core.io import load_tensors, save_tensors, write_json, write_jsonl
from refdir.core.models import release_memory
from refdir.core.prompt_format import canonical_json_object
from refdir.core.runtime import BatchPolicy, Runtime
from refdir.core.templates import PromptFormat, format_prompt, post_instruction_tokens
from refdir.evaluation.conditions import (
    GenJob,
    condition,
    condition_factory,
    generate_conditions,
    generate_judged,
    kl_and_ce,
    per_category,
    refusal_rate,
)
from refdir.evaluation.judges import second_judge
from refdir.method.activations import PostActivationRecorder, mean_activations
from refdir.method.cosmic import select_direction_cosmic
from refdir.method.directions import (
    Direction,
    candidate_directions,
    direction_from_candidates,
    load_direction,
)
from refdir.method.interventions import orthogonalize_weights
from refdir.method.refusal import REFUSAL_PHRASES, last_logits
from refdir.method.screen import prepare_prompts
from refdir.method.selection import SelectionConfig, paper_scores, require_choice, select_direction
from refdir.run.settings import RunConfig

RUN_FORMAT = 1
SCREEN_MEANS = (
    "screen_means.safetensors"  # the training prompts' mean activations, recorded by the prompt screen
)


def _date_free(text: str) -> str:
    """The text with dates like "26 Jul 2024" / "2024-07-26" blanked: a prompt equal to it prints no date."""
    text = re.sub(r"\b\d{1,2} (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)[a-z]* \d{4}\b", "", text)
    return re.sub(r"\b\d{4}-\d{2}-\d{2}\b", "", text)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:16]


class RunFolder:
    """A run folder: one artifact per stage, and ``stages.json`` with each stage's input hash."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.stages_file = self.path / "stages.json"
        self.stages = self._read_stages()
        for stale in self.path.glob(".*.tmp"):  # left by a run killed mid-write
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()

    def _read_stages(self) -> dict:
        if not self.stages_file.exists():
            return {}
        data = _read_meta(self.stages_file)
        stages = data.get("stages", {})
        if not isinstance(stages, dict) or not all(isinstance(v, dict) for v in stages.values()):
            raise RefdirError(f"{self.stages_file} is corrupt; delete the run folder or choose another --out")
        return stages

    def fresh(self, stage: str, key: str, *artifacts: str) -> bool:
        """True when ``stage`` completed with the same inputs and its artifacts are all present."""
        return self.stages.get(stage, {}).get("key") == key and all(
            (self.path / a).exists() for a in artifacts
        )

    def reuse(
        self, stage: str, key: str, artifacts: tuple[str, ...], must_reuse: tuple[str, ...], log
    ) -> bool:
        """True (and logged) when the stage can be reused; an error when it must be but cannot."""
        if self.fresh(stage, key, *artifacts):
            log(f"{stage}: reused")
            return True
        if stage in must_reuse:
            raise RefdirError(
                f"{self.path}: the {stage} stage is missing or out of date; rerun `refdir extract`"
            )
        return False

    def done(self, stage: str, key: str, seconds: float) -> None:
        release_memory()  # the stage's buffers are gone: give their pages back before the next one
        self.stages[stage] = {"key": key, "seconds": round(seconds, 2), "refdir": __version__}
        write_json(self.stages_file, {"format": RUN_FORMAT, "stages": self.stages})

    def file(self, name: str) -> Path:
        return self.path / name

    def artifact_hash(self, name: str) -> str:
        return _file_hash(self.path / name)


def check_run_folder(path: Path, model: str) -> None:
    """Refuse to mix runs: a folder holding another model's run, or a newer format, is an error."""
    cfg_file = path / "config.json"
    if path.exists() and not path.is_dir():
        raise RefdirError(f"--out {path} is a file, not a folder")
    if not cfg_file.exists():
        return
    old = _read_meta(cfg_file)
    if old.get("model") not in (None, model):
        raise RefdirError(
            f"run folder {path} holds a run of model '{old['model']}', not '{model}'; choose another --out"
        )


def _read_meta(path: Path) -> dict:
    """A run-folder metadata file: a JSON object of a format this refdir can read, or one clear error."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RefdirError(f"{path} is corrupt; delete the run folder or choose another --out") from None
    if not isinstance(data, dict):
        raise RefdirError(f"{path} is not refdir run metadata; choose another --out")
    fmt = data.get("format", 1)
    if not isinstance(fmt, int) or isinstance(fmt, bool):
        raise RefdirError(
            f"{path} has an invalid format field; delete the run folder or choose another --out"
        )
    if fmt > RUN_FORMAT:
        raise RefdirError(
            f"{path.parent} was written by a newer refdir (format {fmt}); upgrade refdir or "
            "choose another --out"
        )
    return data


# ----------------------------------------------------------------------------------------------
# Stage 1: prompts (splits, filtering, refusal tokens)


def _instructions(items: list[dict]) -> list[str]:
    return [x["instruction"] for x in items]


# ----------------------------------------------------------------------------------------------
# The pipeline


def run_pipeline(
    cfg: RunConfig,
    out: str | Path,
    model=None,
    tok=None,
    log=print,
    stop_after: str | None = None,
    must_reuse: tuple[str, ...] = (),
    runtime: Runtime | None = None,
) -> dict:
    """Run (or resume) every stage; returns the summary dict written to ``summary.json``.

    The stages share one :class:`~refdir.core.runtime.Runtime` (``runtime``, or built from ``model``/``tok``,
    or loaded from ``cfg``). ``must_reuse`` names stages that must already be complete with unchanged
    inputs (``refdir select`` uses it so that data paths read from a run folder's metadata are never
    followed).
    """
    t_start = time.time()
    check_run_folder(Path(out), cfg.model)
    caps = _CapabilityStage(cfg, log) if cfg.capabilities else None  # tasks and files checked before loading
    if runtime is None:
        runtime = (
            Runtime.load(cfg.model, cfg.fmt, cfg.batch_policy(), **cfg.load_options())
            if model is None
            else Runtime(model, tok, cfg.fmt, cfg.batch_policy() or BatchPolicy())
        )
    rt = runtime.with_format(cfg.fmt)
    model, tok = rt.model, rt.tokenizer
    spec = rt.spec or cfg.model
    load = rt.load_info
    get_adapter(model)  # unsupported architecture: fail before writing anything
    format_prompt(tok, "x", cfg.fmt)  # no chat template: likewise
    run = RunFolder(out)
    # the resolved dtype (auto -> float32 on the CPU keys like an explicit float32); placement does not change
    # what a stage computes beyond float rounding, quantization and revision do
    base_key = {
        "model": spec,
        "refdir": __version__,
        "dtype": load.get("dtype"),
        "system": cfg.system,
        "chat_template": cfg.chat_template,
    }
    base_key.update({k: load[k] for k in ("quantization", "revision") if load.get(k)})
    if cfg.template_kwargs:
        base_key["template_kwargs"] = cfg.template_kwargs
    # the rendered prompt itself: templates that print today's date must not mix two formats in one run
    rendered = format_prompt(tok, "x", cfg.fmt)
    if rendered != _date_free(rendered):
        base_key["rendered_prompt"] = rendered

    # 1. prompts
    key1 = _hash(
        {
            **base_key,
            "data": [
                cfg.harmful,
                cfg.harmless,
                cfg.eval_harmful,
                cfg.eval_harmless,
                cfg.prompt_field,
                cfg.ce_text,
            ],
            "sizes": [cfg.n_train, cfg.n_val, cfg.n_eval],
            "seed": cfg.seed,
            "filter": cfg.filter,
            "refusal_tokens": cfg.refusal_tokens,
            "min_refusal_rate": cfg.min_refusal_rate,
        }
    )
    t = time.time()
    if not run.reuse("prompts", key1, ("prompts.json",), must_reuse, log):
        log("prompts: splitting, filtering and deriving refusal tokens")
        n_post = len(post_instruction_tokens(tok, cfg.fmt))
        recorder = PostActivationRecorder(model, n_post)
        prompts = prepare_prompts(rt, cfg, recorder)
        rows = prompts.pop("_train_rows")
        run.file(SCREEN_MEANS).unlink(missing_ok=True)
        # the training prompts' activations, recorded by the screen's forward passes: extraction is free
        mh, ml = recorder.mean(rows["harmful"]), recorder.mean(rows["harmless"])
        del recorder
        if mh is not None and ml is not None:
            save_tensors(
                run.file(SCREEN_MEANS),
                {"mean_harmful": mh, "mean_harmless": ml},
                metadata={"model": spec, "n_post": str(n_post)},
            )
        write_json(run.file("prompts.json"), prompts)
        run.done("prompts", key1, time.time() - t)
    write_json(
        run.file("config.json"),
        {
            "format": RUN_FORMAT,
            "refdir": __version__,
            **cfg.to_json(),
            "model_spec": spec,
            "load": load,
            "batch_policy": rt.batch.to_json(),
            "architecture": get_adapter(model).describe(),
        },
    )
    data = json.loads(run.file("prompts.json").read_text())
    ref_ids = data["refusal_tokens"]["token_ids"]
    if stop_after == "prompts":
        return data

    # 2. activations and candidates
    screened = run.file(SCREEN_MEANS)
    key2 = _hash(
        {
            "prompts": run.artifact_hash("prompts.json"),
            **base_key,
            "screen_means": run.artifact_hash(SCREEN_MEANS) if screened.exists() else None,
        }
    )
    t = time.time()
    if not run.reuse("extract", key2, ("candidates.safetensors",), must_reuse, log):
        log("extract: mean activations at every layer and post-instruction position")
        hb, lb = (
            rt.encode(_instructions(data["harmful_train"])),
            rt.encode(_instructions(data["harmless_train"])),
        )
        n_post = min(hb.n_post, lb.n_post)
        means = load_tensors(screened) if screened.exists() else {}
        source = "the prompt screen's forward passes (screen_means.safetensors)"
        if means and means["mean_harmful"].shape[0] == n_post:
            log(f"extract: means recorded by {source}")
            mh, ml = means["mean_harmful"], means["mean_harmless"]
        else:
            source = "a separate extraction pass"
            mh = mean_activations(model, hb, n_post, rt.batch.prompt_rows, desc="extract harmful")
            ml = mean_activations(model, lb, n_post, rt.batch.prompt_rows, desc="extract harmless")
        save_tensors(
            run.file("candidates.safetensors"),
            {"directions": candidate_directions(mh, ml), "mean_harmful": mh, "mean_harmless": ml},
            metadata={"model": spec},
        )
        write_json(
            run.file("candidates.json"),
            {
                "model": spec,
                "shape": [n_post, mh.shape[1], mh.shape[2]],
                "axes": ["position", "layer", "d_model"],
                "positions": list(range(-n_post, 0)),
                "post_instruction_tokens": data["prompt_format"]["post_instruction_tokens"],
                "n_harmful": len(data["harmful_train"]),
                "n_harmless": len(data["harmless_train"]),
                "activation": "resid_pre (input of each decoder layer)",
                "accumulation": "float64 mean",
                "recorded_by": source,
            },
        )
        run.done("extract", key2, time.time() - t)
    candidates = load_tensors(run.file("candidates.safetensors"))["directions"]
    if stop_after == "extract":
        return {"candidates": list(candidates.shape)}

    # 3. selection
    # rows per pass change float rounding only; the default selector keeps older run folders' keys
    sel_key = {
        k: v
        for k, v in cfg.selection.to_json().items()
        if k != "batch_rows" and not (k == "selector" and v == "paper")
    }
    key3 = _hash(
        {
            "candidates": run.artifact_hash("candidates.safetensors"),
            "sel": sel_key,
            "prompts": run.artifact_hash("prompts.json"),
            **base_key,
        }
    )
    t = time.time()
    if not run.reuse(
        "select",
        key3,
        (
            "selection.json",
            "direction.safetensors",
        ),
        must_reuse,
        log,
    ):
        log(f"select: scoring {candidates.shape[0] * candidates.shape[1]} candidate directions")
        hv, lv = rt.encode(_instructions(data["harmful_val"])), rt.encode(_instructions(data["harmless_val"]))
        sel_cfg = dataclasses.replace(cfg.selection, batch_rows=rt.batch.select_rows)
        if sel_cfg.induce_threshold is None:  # auto: the calibrated refusal threshold of this model
            sel_cfg = SelectionConfig(**{**sel_cfg.to_json(), "induce_threshold": data["metric_threshold"]})
        if sel_cfg.selector == "cosmic":
            htr, ltr = (
                rt.encode(_instructions(data["harmful_train"])),
                rt.encode(_instructions(data["harmless_train"])),
            )
            res = select_direction_cosmic(model, candidates, hv, lv, htr, ltr, sel_cfg)
        else:
            res = select_direction(model, candidates, hv, lv, ref_ids, sel_cfg)
        sel = res.to_json()
        sel["seconds"] = round(time.time() - t, 2)
        sel["config"] = sel_cfg.to_json()
        write_json(run.file("selection.json"), sel)
        p, l = require_choice(res)
        if (
            sel_cfg.selector == "cosmic"
        ):  # and the paper's scores of the same candidate, to compare the selectors
            paper = paper_scores(model, candidates, p, l, hv, lv, ref_ids, sel_cfg)
            scores = {
                "cosmic_refusal": float(res.bypass[p, l]),
                "cosmic_steering": float(res.induce[p, l]),
                "kl": float(res.kl[p, l]),
                **paper,
            }
        else:
            scores = {
                "bypass": float(res.bypass[p, l]),
                "induce": float(res.induce[p, l]),
                "kl": float(res.kl[p, l]),
                **res.baseline,
            }
        d = direction_from_candidates(candidates, p, l, spec, scores)
        d.extra = {
            "token": data["prompt_format"]["post_instruction_tokens"][p],
            "refusal_tokens": data["refusal_tokens"]["tokens"],
            "seed": cfg.seed,
            "sizes": {"n_train": cfg.n_train, "n_val": cfg.n_val, "n_eval": cfg.n_eval},
            "prompt_format": data["prompt_format"],
        }
        d.save(run.file("direction"))
        run.done("select", key3, time.time() - t)
    direction = load_direction(run.path, expect_d_model=candidates.shape[-1])
    if stop_after == "select":
        return direction.meta()

    # 4a. capability benchmarks, baseline half: before the evaluation edits the weights
    if caps is not None:
        caps.baseline(run, rt, direction, base_key, must_reuse)

    # 4. evaluation
    key4 = _hash(
        {
            "direction": run.artifact_hash("direction.safetensors"),
            "prompts": run.artifact_hash("prompts.json"),
            "max_new_tokens": cfg.max_new_tokens,
            "ortho": cfg.regenerate_ortho,
            "judge": cfg.judge,
            **base_key,
        }
    )
    t = time.time()
    if not run.reuse(
        "evaluate",
        key4,
        (
            "eval.json",
            "completions.jsonl",
        ),
        must_reuse,
        log,
    ):
        log("evaluate: generating completions under each condition")
        ev, rows = evaluate_direction(rt, direction, data, cfg, log)
        ev["seconds"] = round(time.time() - t, 2)
        write_jsonl(run.file("completions.jsonl"), rows)
        write_json(run.file("eval.json"), ev)
        run.done("evaluate", key4, time.time() - t)
    ev = json.loads(run.file("eval.json").read_text())
    # 4b. capability benchmarks, orthogonalized half: the evaluation left the weights orthogonalized
    if caps is not None:
        caps.finish(run, rt, direction)

    # 5. report
    from refdir.outputs.report import write_report

    write_report(run.path)
    summary = summarize(run.path)
    summary["wall_seconds_this_invocation"] = round(time.time() - t_start, 1)
    write_json(run.file("summary.json"), summary)
    return summary


class _CapabilityStage:
    """Capability benchmarks in two halves around the evaluation, which orthogonalizes the weights in place:
    the baseline pass before it (``capabilities_baseline.json``), the orthogonalized pass after it, on the
    same items (``capabilities.json``). No second copy of the model; either half resumes."""

    BASELINE, RESULT = "capabilities_baseline.json", "capabilities.json"

    def __init__(self, cfg: RunConfig, log):
        from refdir.evaluation.capabilities import plan_tasks

        self.log, self.key = log, None
        self._stack = contextlib.ExitStack()
        self.plan = self._stack.enter_context(
            plan_tasks(
                cfg.capabilities,
                cfg.capabilities_data_dir,
                cfg.capabilities_limit,
                cfg.capabilities_fewshot,
                cfg.capabilities_max_gen_toks,
            )
        )

    def baseline(self, run: RunFolder, rt: Runtime, direction: Direction, base_key: dict, must_reuse) -> None:
        from refdir.evaluation.capabilities import require_harness, run_condition, scores_to_json

        self.key = _hash(
            {
                "direction": run.artifact_hash("direction.safetensors"),
                "tasks": self.plan.key(),
                "harness": require_harness().__version__,
                **base_key,
            }
        )
        if run.reuse("capabilities", self.key, (self.RESULT,), must_reuse, self.log):
            self.done = True
            return
        self.done = False
        f = run.file(self.BASELINE)
        if f.is_file() and json.loads(f.read_text()).get("key") == self.key:
            self.log("capabilities: baseline pass reused")
            return
        if getattr(rt.model, "_refdir_orthogonalized", False):
            raise RefdirError(
                "the capability baseline needs the model's own weights, but they are orthogonalized"
            )
        self.log(f"capabilities: baseline pass ({', '.join(self.plan.names)})")
        t = time.time()
        scores = run_condition(rt, self.plan, self.log)
        write_json(
            f, {"key": self.key, "seconds": round(time.time() - t, 1), "scores": scores_to_json(scores)}
        )

    def finish(self, run: RunFolder, rt: Runtime, direction: Direction) -> None:
        from refdir.evaluation.capabilities import (
            harness_batches,
            result_json,
            run_condition,
            scores_from_json,
        )

        try:
            if self.done:
                return
            if not getattr(rt.model, "_refdir_orthogonalized", False):  # the evaluation was reused
                orthogonalize_weights(rt.model, direction.vector, allow_approximate=True)
            self.log("capabilities: orthogonalized pass on the same items")
            t = time.time()
            base = scores_from_json(json.loads(run.file(self.BASELINE).read_text())["scores"])
            treated = run_condition(rt, self.plan, self.log)
            res = result_json(rt.spec, direction, self.plan, base, treated, harness_batches(rt))
            write_json(run.file(self.RESULT), res)
            run.done("capabilities", self.key, time.time() - t)
        finally:
            self._stack.close()


def evaluate_direction(
    rt: Runtime, direction: Direction, data: dict, cfg: RunConfig, log=lambda message: None
) -> tuple[dict, list[dict]]:
    """Refusal rates per condition, KL/CE on harmless prompts, and orthogonalization ≡ ablation.

    The model's weights are orthogonalized in place at the end (keeping a second copy would
    double peak memory): pass a model you no longer need unmodified.
    """
    model, tok = rt.model, rt.tokenizer
    fmt, bs, gbs, n_new = rt.fmt, rt.batch.prompt_rows, rt.batch.gen_rows, cfg.max_new_tokens
    harm, harmless = data["eval_harmful"], data["eval_harmless"]
    hp, hcat = _instructions(harm), [x.get("category") for x in harm]
    lp, lcat = _instructions(harmless), [x.get("category") for x in harmless]
    results: dict[str, dict] = {}
    rows: list[dict] = []

    def record(cond: str, split: str, items):
        results.setdefault(split, {})[cond] = {
            "refusal_rate": refusal_rate(items),
            "n": len(items),
            "per_category": per_category(items),
        }
        rows.extend(
            {
                "split": split,
                "condition": cond,
                "prompt": j.prompt,
                "category": j.category,
                "refused": j.refused,
                "completion": j.completion,
            }
            for j in items
        )
        return items

    # all five conditions in shared batches, a refusing condition next to an answering one (rows that
    # refuse leave the batch after a dozen tokens; the answers keep it wide)
    jobs = [
        GenJob("harmful/baseline", "baseline", hp, hcat),
        GenJob("harmful/ablation", "ablation", hp, hcat),
        GenJob("harmless/actadd+", "actadd+", lp, lcat),
        GenJob("harmful/actadd-", "actadd-", hp, hcat),
        GenJob("harmless/baseline", "baseline", lp, lcat),
    ]
    judged = generate_conditions(model, tok, jobs, direction, fmt, n_new, gbs)
    for split, cond in (
        ("harmful", "baseline"),
        ("harmful", "ablation"),
        ("harmful", "actadd-"),
        ("harmless", "baseline"),
        ("harmless", "actadd+"),
    ):
        record(cond, split, judged[f"{split}/{cond}"])

    if cfg.judge:
        log(f"evaluate: second judge ({cfg.judge})")
    judge = (
        second_judge(model, tok, rows, cfg.judge, fmt, load_options=_judge_load(cfg)) if cfg.judge else None
    )
    log("evaluate: KL and cross-entropy on harmless prompts and text")

    # KL and CE on harmless prompts, teacher-forced on the model's own baseline completions
    base_comps = [r["completion"] for r in rows if r["split"] == "harmless" and r["condition"] == "baseline"]
    ctx = {c: condition_factory(model, c, direction) for c in ("baseline", "ablation", "actadd+")}
    klce = kl_and_ce(model, tok, lp, base_comps, fmt, ctx, n_tokens=16, batch_size=bs)
    # CE on harmless instruction + response text written by people (paper Table 7), first 64 tokens
    pairs = data.get("ce_text") or []
    pair_ins, pair_resp = [x["instruction"] for x in pairs], [x["response"] for x in pairs]
    text = kl_and_ce(model, tok, pair_ins, pair_resp, fmt, ctx, n_tokens=64, batch_size=bs) if pairs else {}
    b = rt.encode(hp[:16])
    with condition(model, "ablation", direction):
        la = last_logits(model, b.input_ids, b.attention_mask)

    # orthogonalized weights, in place and last (no second copy of the model in memory): equal to
    # ablation on logits (always checked); regenerated and re-scored only with --preset paper
    exact = get_adapter(model).linear_writes
    log("evaluate: orthogonalizing the weights, checked against ablation")
    release_memory()  # untying the unembedding allocates a vocab x d copy: not on top of freed buffers
    orthogonalize_weights(model, direction.vector, allow_approximate=True)
    lo = last_logits(model, b.input_ids, b.attention_mask)
    ortho_check = {
        "max_abs_logit_diff_vs_ablation": float((la - lo).abs().max()),
        "n_prompts": b.input_ids.shape[0],
        "exact_by_construction": exact,
    }
    if cfg.regenerate_ortho:
        record("ortho", "harmful", generate_judged(model, tok, hp, hcat, fmt, n_new, gbs, "harmful/ortho"))
        # the baseline is gone from memory: CE of the baseline completions under the orthogonalized weights
        ce = kl_and_ce(model, tok, lp, base_comps, fmt, {"baseline": contextlib.nullcontext}, 16, bs)[
            "baseline"
        ]
        klce["ortho"] = {
            **klce["ablation"],
            "ce": ce["ce"],
            "ce_tokens": ce["ce_tokens"],
            "kl_from": "ablation (logit-equivalent; the baseline weights are gone)",
        }
        if pairs:
            ce_t = kl_and_ce(
                model, tok, pair_ins, pair_resp, fmt, {"baseline": contextlib.nullcontext}, 64, bs
            )["baseline"]
            text["ortho"] = {**text["ablation"], "ce": ce_t["ce"], "kl_from": "ablation (logit-equivalent)"}
    else:  # ortho ≡ ablation: its completions and scores are those of ablation (checked on logits above)
        results["harmful"]["ortho"] = {
            **results["harmful"]["ablation"],
            "from": "ablation (logit-equivalent)",
        }
        klce["ortho"] = {**klce["ablation"], "from": "ablation (logit-equivalent)"}
        if text:
            text["ortho"] = {**text["ablation"], "from": "ablation (logit-equivalent)"}
    ev = {
        "direction": direction.meta(),
        "refusal": results,
        "kl_ce_harmless": klce,
        "ce_harmless_text": text,
        "ortho_check": ortho_check,
        "judge": judge,
        "max_new_tokens": n_new,
        "refusal_phrases": list(REFUSAL_PHRASES),
    }
    return ev, rows


def _judge_load(cfg: RunConfig) -> dict:
    """A classifier judge goes where the run's model computes, in its dtype (a device map is the model's
    own)."""
    return {"device": cfg.device, "dtype": cfg.dtype, "trust_remote_code": cfg.trust_remote_code}


def judge_run(
    run_path: Path,
    judge_spec: str,
    model,
    tok,
    fmt: PromptFormat | None = None,
    only: list[str] | None = None,
    load_options: dict | None = None,
) -> dict:
    """Add (or replace) the second judge of a finished run from its stored completions: no regeneration.

    The chat judge reads its prompt in ``fmt`` (default: the run's own prompt format). Rewrites
    eval.json, the report and summary.json; returns the judge's results."""
    from refdir.core.io import read_jsonl
    from refdir.outputs.report import write_report

    ev_file, comp_file = run_path / "eval.json", run_path / "completions.jsonl"
    if not ev_file.is_file() or not comp_file.is_file():
        raise RefdirError(f"{run_path} has no evaluation yet: run `refdir run --out {run_path}` first")
    cfg = _read_meta(run_path / "config.json")
    fmt = fmt or PromptFormat(
        system=cfg.get("system"),
        chat_template=cfg.get("chat_template"),
        template_kwargs=canonical_json_object(cfg.get("template_kwargs")),
    )
    ev = json.loads(ev_file.read_text())
    ev["judge"] = second_judge(model, tok, read_jsonl(comp_file), judge_spec, fmt, only, load_options)
    write_json(ev_file, ev)
    write_report(run_path)
    summary = summarize(run_path)
    write_json(run_path / "summary.json", summary)
    return ev["judge"]


def summarize(run_path: Path) -> dict:
    """The headline numbers of a finished run (printed as a table by the CLI)."""
    ev = json.loads((run_path / "eval.json").read_text())
    caps_file = run_path / _CapabilityStage.RESULT
    caps = json.loads(caps_file.read_text())["results"] if caps_file.is_file() else []
    d = ev["direction"]
    r = ev["refusal"]
    klce = ev["kl_ce_harmless"]
    return {
        "model": json.loads((run_path / "config.json").read_text()).get("model_spec"),
        "layer": d["layer"],
        "pos": d["pos"],
        "norm": round(d["norm"], 3),
        "kl_selection": round(d["scores"].get("kl", float("nan")), 4),
        "harmful_refusal": {c: round(v["refusal_rate"], 3) for c, v in r["harmful"].items()},
        "harmless_refusal": {c: round(v["refusal_rate"], 3) for c, v in r["harmless"].items()},
        "ce_harmless": {c: round(v["ce"], 4) for c, v in klce.items()},
        "ce_harmless_text": {c: round(v["ce"], 4) for c, v in (ev.get("ce_harmless_text") or {}).items()},
        "kl_harmless_first": {c: round(v["kl_first"], 4) for c, v in klce.items()},
        "ortho_max_logit_diff": ev["ortho_check"]["max_abs_logit_diff_vs_ablation"],
        "judge_refusal": {
            k: round(v["refusal_rate"], 3)
            for k, v in ((ev.get("judge") or {}).get("conditions") or {}).items()
        },
        "capabilities": {
            r["task"]: {
                "n": r["n"],
                "baseline": round(r["baseline"], 4),
                "orthogonalized": round(r["orthogonalized"], 4),
                "delta": round(r["delta"], 4),
                "delta_ci95": [round(x, 4) for x in r["delta_ci95"]],
                **(
                    {"lost": r["lost"], "gained": r["gained"], "mcnemar_p": round(r["mcnemar_p"], 4)}
                    if "mcnemar_p" in r
                    else {}
                ),
            }
            for r in caps
        },
    }
