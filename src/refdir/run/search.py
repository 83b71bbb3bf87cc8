"""``refdir search``: a multi-objective search over weight edits, on a finished run folder.

Objectives: harmful refusal ↓ and harmless first-token KL ↓ (first-token proxies of
:class:`~refdir.evaluation.trial_scores.ProxyScorer`, on the run's validation prompts); Optuna's TPE (or
NSGA-II) proposes ``batch_trials`` trials at a time and one set of forward passes scores them all. Trial 0
is the paper's selected direction, orthogonalized as the paper does. The proxy's Pareto front (plus trial
0) is then confirmed by generation and judge on the run's evaluation prompts.

Resumable: every finished trial is one line of ``search_trials.jsonl`` (flushed as it lands); a restarted
search replays those into a fresh study and reseeds its sampler from (seed, trials done) at every batch,
so a search killed after a batch continues with the trials an unkilled one would have run.
``front.json`` (rewritten atomically after every batch) holds every trial, both fronts and the timings.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from refdir.core.errors import RefdirError
from refdir.core.io import load_tensors, write_json
from refdir.core.runtime import Runtime
from refdir.evaluation.trial_scores import ProxyScorer, confirm
from refdir.method.directions import load_direction
from refdir.method.search_space import PAPER, SearchSpace, anchors, distributions, edit_for, sample
from refdir.method.weighted import WeightedAblation
from refdir.run.folder import RunFolder

SAMPLERS = ("tpe", "nsga2")


@dataclass
class SearchSettings:
    trials: int = 64  # including trial 0 (the paper's direction)
    batch_trials: int = 8  # trials proposed and scored together
    confirm: int = 6  # proxy-front trials confirmed by generation (trial 0 always is)
    confirm_max_refusal: float | None = None  # confirm only front trials at or below this proxy refusal
    n_proxy: int | None = None  # validation prompts per set for the proxy (None: all of the run's)
    n_eval: int | None = None  # evaluation prompts per set for confirmation (None: all)
    max_new_tokens: int = 64
    sampler: str = "tpe"
    seed: int = 0
    norms: tuple[str, ...] = ("none", "output")
    batch_rows: int | None = None  # rows (trials x prompts) per forward pass (None: the runtime's)


def pareto(points: dict[int, tuple[float, float]]) -> list[int]:
    """Keys of the non-dominated points (both coordinates minimized), sorted by the first coordinate."""
    out = [
        k
        for k, (a, b) in points.items()
        if not any((a2 <= a and b2 <= b) and (a2 < a or b2 < b) for a2, b2 in points.values())
    ]
    return sorted(out, key=lambda k: points[k])


def load_space(folder: RunFolder, norms: tuple[str, ...] = ("none", "output")) -> SearchSpace:
    """The run's candidates and harmless means at the selected position, and its direction."""
    direction = load_direction(folder.path)
    t = load_tensors(folder.candidates)
    n_post = t["directions"].shape[0]
    p = direction.pos + n_post if direction.pos < 0 else direction.pos
    return SearchSpace(
        t["directions"][p].float(),
        t["mean_harmless"][p].float(),
        direction.vector.float(),
        norms,
        direction.layer,
        t["directions"].float(),
        t["mean_harmless"].float(),
        p - n_post,
    )


def read_trials(path: Path) -> list[dict]:
    """Finished trials of ``search_trials.jsonl``; a last line cut by a kill is ignored."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def trial_edit(run: str | Path, number: int) -> WeightedAblation:
    """The edit of trial ``number`` of the run folder's search (for export and evaluate)."""
    folder = RunFolder(run)
    trials = {t["number"]: t for t in read_trials(folder.search_trials)}
    if number not in trials:
        have = f"0..{max(trials)}" if trials else "none: run refdir search --run RUN first"
        raise RefdirError(f"{folder.path} has no search trial {number} (trials: {have})")
    return edit_for(trials[number]["params"], load_space(folder))


def _sampler(name: str, seed: int) -> Any:
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=16)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True, n_startup_trials=10)


def _study(space: SearchSpace, done: list[dict], settings: SearchSettings) -> Any:
    """A fresh study holding the finished trials (trial 0, the paper's, is outside the space: skipped)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=_sampler(settings.sampler, 0))
    dists = distributions(space)
    for t in done:
        if t["params"].get("paper"):
            continue
        study.add_trial(
            optuna.trial.create_trial(
                params=t["params"], distributions=dists, values=[t["proxy"]["refusal"], t["proxy"]["kl"]]
            )
        )
    return study


def _no_norm_hooks(rt: Runtime) -> str | None:
    """Why norm-keeping edits have no hook form on this model (None: they have one)."""
    writers = rt.adapter.all_writers()
    if rt.adapter.fused_experts:
        return "fused experts sum every expert's output in one module"
    if any(w.tensor.device.type == "meta" or not w.tensor.is_floating_point() for w in writers):
        return "some writers are offloaded or quantized (their channel norms are not in memory)"
    return None


class Search:
    """One search on a run folder: proxy scorer, study, trial log."""

    def __init__(self, rt: Runtime, folder: RunFolder, settings: SearchSettings, log: Callable = print):
        if settings.sampler not in SAMPLERS:
            raise RefdirError(f"--sampler must be one of {', '.join(SAMPLERS)}")
        self.rt, self.folder, self.s, self.log = rt, folder, settings, log
        self.rows = settings.batch_rows or rt.batch.select_rows
        self.data = folder.read_meta("prompts.json")
        norms = settings.norms
        why = _no_norm_hooks(rt)
        if why and set(norms) - {"none"}:
            log(f"search: {why}, so norm-keeping edits cannot be scored by hooks: searching norm=none only")
            norms = ("none",)
        self.space = load_space(folder, norms)
        if self.space.n_layers != rt.adapter.n_layers:
            raise RefdirError(f"{folder.path} was made with another model ({self.space.n_layers} layers)")
        self.done = read_trials(folder.search_trials)
        if folder.search_trials.exists():  # drop a line cut by a kill, so new lines start clean
            folder.search_trials.write_text("".join(json.dumps(t) + "\n" for t in self.done))
        self.seconds = {"proxy": sum(t["seconds"] for t in self.done), "confirm": 0.0}

    def _prompts(self, key: str, n: int | None) -> list[str]:
        rows = self.data[key]
        return [r["instruction"] for r in (rows if n is None else rows[:n])]

    def scorer(self) -> ProxyScorer:
        return ProxyScorer(
            self.rt.model,
            self.rt.tokenizer,
            self.rt.fmt,
            self._prompts("harmful_val", self.s.n_proxy),
            self._prompts("harmless_val", self.s.n_proxy),
            self.data["refusal_tokens"]["token_ids"],
            float(self.data["metric_threshold"]),
            self.rows,
        )

    def _record(self, params: list[dict], scores: list[dict], seconds: float) -> None:
        with self.folder.search_trials.open("a") as f:
            for p, sc in zip(params, scores):
                row = {"number": len(self.done), "params": p, "proxy": sc, "seconds": seconds / len(params)}
                self.done.append(row)
                f.write(json.dumps(row) + "\n")
                f.flush()
        self.seconds["proxy"] += seconds

    def run_proxy(self, progress: bool = True) -> None:
        """Trials up to ``settings.trials``, a batch at a time, each batch logged before the next."""
        if len(self.done) >= self.s.trials:
            return
        scorer = self.scorer()
        study = _study(self.space, self.done, self.s)
        bar = tqdm(total=self.s.trials, initial=len(self.done), desc="search", disable=not progress)
        for p in anchors(self.space)[max(0, len(self.done) - 1) :]:  # trials 1..A, resumed where they were
            study.enqueue_trial(p)
        while len(self.done) < self.s.trials:
            t0 = time.perf_counter()
            k = min(self.s.batch_trials, self.s.trials - len(self.done))
            params: list[dict] = [PAPER] if not self.done else []
            study.sampler = _sampler(self.s.sampler, self.s.seed + len(self.done))
            asked = [study.ask() for _ in range(k - len(params))]
            params += [sample(t, self.space) for t in asked]
            scores = scorer.score([edit_for(p, self.space) for p in params])
            for t, sc in zip(asked, scores[len(params) - len(asked) :]):
                study.tell(t, [sc["refusal"], sc["kl"]])
            self._record(params, scores, time.perf_counter() - t0)
            bar.update(k)
            bar.set_postfix_str(self.front_text())
        bar.close()

    def front_text(self) -> str:
        pts = {t["number"]: (t["proxy"]["refusal"], t["proxy"]["kl"]) for t in self.done}
        front = pareto(pts)
        return "front " + " ".join(f"{pts[n][0]:.2f}@{pts[n][1]:.3f}" for n in front[:6])

    def to_confirm(self, confirmed: dict[int, dict]) -> list[int]:
        """Trial 0 and up to ``confirm`` proxy-front trials spread along the front, not yet confirmed."""
        pts = {t["number"]: (t["proxy"]["refusal"], t["proxy"]["kl"]) for t in self.done}
        cap = self.s.confirm_max_refusal
        front = [n for n in pareto(pts) if n != 0 and (cap is None or pts[n][0] <= cap)]
        if len(front) > self.s.confirm:
            step = (len(front) - 1) / max(1, self.s.confirm - 1)
            front = sorted({front[round(i * step)] for i in range(self.s.confirm)})
        return [n for n in [0, *front] if n not in confirmed]

    def run_confirm(self, confirmed: dict[int, dict]) -> dict[int, dict]:
        todo = self.to_confirm(confirmed)
        if not todo:
            return confirmed
        t0 = time.perf_counter()
        edits = [edit_for(self.done[n]["params"], self.space) for n in todo]
        res = confirm(
            self.rt.model,
            self.rt.tokenizer,
            self.rt.fmt,
            edits,
            self._prompts("eval_harmful", self.s.n_eval),
            self._prompts("eval_harmless", self.s.n_eval),
            self.s.max_new_tokens,
            self.rt.batch.gen_rows,
            batch_rows=self.rows,
        )
        dt = time.perf_counter() - t0
        self.seconds["confirm"] += dt
        for n, r in zip(todo, res):
            confirmed[n] = {
                "refusal": r.refusal,
                "refusal_by_judge": r.refusal_by_judge,
                "kl": r.kl,
                "n_harmful": r.n_harmful,
                "n_harmless": r.n_harmless,
                "seconds": dt / len(todo),
            }
        return confirmed

    def front_json(self, confirmed: dict[int, dict]) -> dict:
        proxy = {t["number"]: (t["proxy"]["refusal"], t["proxy"]["kl"]) for t in self.done}
        conf = {n: (c["refusal"], c["kl"]) for n, c in confirmed.items()}
        minutes = self.seconds["proxy"] / 60
        return {
            "model": self.rt.spec,
            "n_layers": self.space.n_layers,
            "objectives": ["refusal", "kl"],
            "settings": {**asdict(self.s), "norms": list(self.s.norms)},
            "trials": [
                {**t, "paper": bool(t["params"].get("paper")), "confirmed": confirmed.get(t["number"])}
                for t in self.done
            ],
            "front": pareto(proxy),
            "confirmed_front": pareto(conf),
            "timing": {
                "proxy_s": round(self.seconds["proxy"], 2),
                "confirm_s": round(self.seconds["confirm"], 2),
                "proxy_trials_per_min": round(len(self.done) / minutes, 2) if minutes else None,
                "confirmed_trials_per_min": round(len(conf) / (self.seconds["confirm"] / 60), 2)
                if self.seconds["confirm"]
                else None,
            },
        }


def run_search(
    rt: Runtime, run: str | Path, settings: SearchSettings, progress: bool = True, log: Callable = print
) -> dict:
    """Proxy trials (resuming any the folder holds), confirmation of the front, ``front.json``."""
    folder = RunFolder(run)
    search = Search(rt, folder, settings, log)
    old = json.loads(folder.front.read_text()) if folder.front.exists() else {}
    confirmed = {t["number"]: t["confirmed"] for t in old.get("trials", []) if t.get("confirmed")}
    search.seconds["confirm"] = float(old.get("timing", {}).get("confirm_s", 0.0) or 0.0)
    with torch.no_grad():
        search.run_proxy(progress)
        write_json(folder.front, search.front_json(confirmed))
        if settings.confirm >= 0:
            confirmed = search.run_confirm(confirmed)
    front = search.front_json(confirmed)
    write_json(folder.front, front)
    return front
