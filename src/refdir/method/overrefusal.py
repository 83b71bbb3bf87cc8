"""The false-refusal direction (Wang et al., ICLR 2025, "Surgical, Cheap, and Flexible: Mitigating False
Refusal in Language Models via Single Vector Ablation").

A chat model refuses some safe prompts that sound unsafe ("How do I kill a zombie process?"). Wang et al.
take the difference of means between such *pseudo-harmful* prompts the model refuses and harmless ones,
remove its component along the refusal direction r̂, and ablate what is left: the model stops refusing
the safe-but-scary prompts and, because r̂ itself is untouched, keeps refusing harmful ones.

Here, as in the run's own selection (:mod:`refdir.method.selection`):

* the pseudo-harmful training prompts are scored at baseline by the run's refusal metric (first-token
  log-odds of its refusal tokens) and those above the run's calibrated threshold are kept (with a floor:
  a model that rarely over-refuses still gets a direction from its most-refused prompts);
* ``v[p, l] = mean(kept pseudo-harmful) - mean(harmless train)`` at every layer l and post-instruction
  position p (the run's candidates' positions), then ``v <- v - (v·r̂) r̂`` in float64;
* each candidate is ablated at every layer and scored from one batched pass per group of candidates
  (:func:`~refdir.core.prefix.per_trial_last_logits`): (a) mean refusal metric on held-out pseudo-harmful
  prompts (lower is better), (b) mean refusal metric on the run's harmful validation prompts (must stay
  above a floor), (c) first-token KL on the run's harmless validation prompts (< 0.1 as in the paper).
  The lowest (a) among candidates passing (b) and (c) is the choice.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from refdir.core.errors import RefdirError
from refdir.core.prefix import last_logits_shared, per_trial_last_logits, split_prefix
from refdir.core.templates import Batch
from refdir.core.types import Model
from refdir.method.interventions import directional_ablation
from refdir.method.refusal import refusal_metric
from refdir.method.selection import concat_batches, kl_divergence


@dataclass(frozen=True)
class OverrefusalConfig:
    """How the false-refusal direction is found. ``n_val``: pseudo-harmful prompts held out for score (a)
    (the rest train the mean); ``keep_frac`` / ``min_keep``: the floor of the kept-prompt rule;
    ``layer_stride``: score every stride-th layer only; ``max_layer_frac``: skip the last layers (the paper's
    0.8); ``harmful_margin``: the harmful validation log-odds may drop by less than this (and must stay above
    the run's threshold where the baseline is above it); ``chunk``: candidates per batched pass group."""

    n_val: int = 24
    keep_frac: float = 0.25
    min_keep: int = 8
    layer_stride: int = 1
    max_layer_frac: float = 0.8
    kl_threshold: float = 0.1
    harmful_margin: float = 1.0
    chunk: int = 8
    seed: int = 0

    def to_json(self) -> dict:
        return asdict(self)


def keep_refused(
    metric: torch.Tensor, threshold: float, keep_frac: float = 0.25, min_keep: int = 8
) -> tuple[list[int], dict]:
    """Indices of the prompts the model refuses (``metric`` ``[N]`` > ``threshold``), at least the top
    ``max(min_keep, ceil(keep_frac * N))`` by metric (all N if fewer): a model that rarely over-refuses
    still gets a direction, from the prompts it comes closest to refusing. Returns them and the record."""
    n = int(metric.shape[0])
    if n == 0:
        raise RefdirError("no pseudo-harmful training prompts to score")
    above = (metric > threshold).nonzero().flatten().tolist()
    floor = min(n, max(min_keep, math.ceil(keep_frac * n)))
    by_metric = torch.argsort(metric, descending=True, stable=True).tolist()
    kept = sorted(above) if len(above) >= floor else sorted(by_metric[:floor])
    record = {
        "rule": f"refusal metric > threshold, at least the top max({min_keep}, ceil({keep_frac} x n))",
        "threshold": round(float(threshold), 6),
        "n_scored": n,
        "n_above_threshold": len(above),
        "floor": floor,
        "n_kept": len(kept),
        "filled_by_floor": len(above) < floor,
        "metric_mean_scored": round(float(metric.mean()), 6),
        "metric_mean_kept": round(float(metric[kept].mean()), 6),
    }
    return kept, record


def false_refusal_candidates(
    mean_pseudo: torch.Tensor, mean_harmless: torch.Tensor, refusal: torch.Tensor
) -> torch.Tensor:
    """``v[p, l] = mean_pseudo - mean_harmless`` ``[n_post, L, d]`` with its component along the refusal
    direction ``refusal`` ``[d]`` removed (float64 throughout): ablating v then leaves r̂'s component of the
    residual stream untouched, so the model keeps refusing what r̂ makes it refuse."""
    if mean_pseudo.shape != mean_harmless.shape:
        raise RefdirError(
            f"mean activations differ in shape: {tuple(mean_pseudo.shape)} vs {tuple(mean_harmless.shape)}"
        )
    v = mean_pseudo.double() - mean_harmless.double()
    r = refusal.double().flatten()
    r = r / r.norm()
    return v - (v @ r)[..., None] * r


class FalseRefusalScorer:
    """The three validation sets in one left-padded batch, their baseline, and the batched candidate scores:
    every candidate costs one ablated pass over pseudo-harmful + harmful + harmless prompts together."""

    def __init__(
        self,
        model: Model,
        pseudo: Batch,
        harmful: Batch,
        harmless: Batch,
        refusal_ids: list[int],
        batch_rows: int = 64,
    ):
        self.model, self.batch_rows = model, batch_rows
        self.ids = torch.tensor(refusal_ids)
        self.n_fr, self.n_harm = pseudo.input_ids.shape[0], harmful.input_ids.shape[0]
        self.pb = split_prefix(concat_batches(concat_batches(pseudo, harmful), harmless), True, model)
        base = last_logits_shared(model, self.pb)  # [N, V]
        self.base_logp = torch.log_softmax(base[self.n_fr + self.n_harm :].double(), -1)  # [N_harmless, V]
        fr, harm, _ = self._split_scores(base[None], with_kl=False)
        self.baseline = {"false_refusal": float(fr[0]), "harmful": float(harm[0])}

    def _split_scores(
        self, logits: torch.Tensor, with_kl: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(a), (b), (c) ``[K]`` each from ablated logits ``[K, N, V]``."""
        a, b = self.n_fr, self.n_fr + self.n_harm
        fr = torch.stack([refusal_metric(x[:a], self.ids).mean() for x in logits])
        harm = torch.stack([refusal_metric(x[a:b], self.ids).mean() for x in logits])
        kl = (
            torch.stack([kl_divergence(self.base_logp, x[b:]).mean() for x in logits])
            if with_kl
            else torch.zeros(logits.shape[0])
        )
        return fr.cpu(), harm.cpu(), kl.cpu()

    @torch.no_grad()
    def scores(self, units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scores (a) false refusal, (b) harmful, (c) KL ``[K]`` of unit candidates ``[K, d]``, each ablated
        at every layer, from one batched pass (a different candidate per batch row)."""
        logits = per_trial_last_logits(
            self.model,
            self.pb,
            units.shape[0],
            self.batch_rows,
            lambda t: directional_ablation(self.model, units[t]),
        )
        return self._split_scores(logits)

    @torch.no_grad()
    def scores_one(self, unit: torch.Tensor) -> tuple[float, float, float]:
        """The same three scores of one candidate from a plain ablated pass (the batched scores' check)."""
        with directional_ablation(self.model, unit):
            logits = last_logits_shared(self.model, self.pb)
        fr, harm, kl = self._split_scores(logits[None])
        return float(fr[0]), float(harm[0]), float(kl[0])


def harmful_floor(baseline_harmful: float, threshold: float, margin: float) -> float:
    """Score (b)'s floor: the harmful log-odds may drop by less than ``margin``, and must stay above the
    run's refusal threshold where the baseline is above it (a weak model's harmful baseline may not be)."""
    floor = baseline_harmful - margin
    return max(floor, threshold) if baseline_harmful > threshold else floor


def rounded(table: torch.Tensor) -> list[list[float | None]]:
    """A score table ``[n_post, L]`` as JSON: six decimals, None where not scored (NaN)."""
    return [[None if math.isnan(x) else round(x, 6) for x in row] for row in table.tolist()]


@dataclass
class FalseRefusalSelection:
    """Every candidate's scores ``[n_post, L]`` (NaN: not scored), the reasons, and the choice."""

    false_refusal: torch.Tensor
    harmful: torch.Tensor
    kl: torch.Tensor
    reasons: list[list[str]]  # "chosen" | "ok" | "harmful" | "kl" | "layer" | "stride" | "zero"
    chosen: tuple[int, int] | None  # (pos_index, layer)
    baseline: dict
    floor: float
    kl_threshold: float

    def counts(self) -> dict[str, int]:
        return dict(Counter(r for row in self.reasons for r in row))

    def to_json(self) -> dict:
        return {
            "false_refusal": rounded(self.false_refusal),
            "harmful": rounded(self.harmful),
            "kl": rounded(self.kl),
            "reasons": self.reasons,
            "chosen": list(self.chosen) if self.chosen else None,
            "baseline": self.baseline,
            "harmful_floor": round(self.floor, 6),
            "kl_threshold": self.kl_threshold,
            "counts": self.counts(),
        }


def choose_false_refusal(
    fr: torch.Tensor,
    harm: torch.Tensor,
    kl: torch.Tensor,
    skipped: list[list[str]],
    floor: float,
    kl_max: float,
) -> tuple[list[list[str]], tuple[int, int] | None]:
    """Each candidate's reason ``[n_post][L]`` and the lowest score (a) among those whose score (b) is above
    ``floor`` and whose KL is below ``kl_max`` (its reason "chosen"), or None. ``skipped``: the reason of
    each unscored candidate ("" where scored)."""
    n_post, n_layers = fr.shape
    reasons = [["" for _ in range(n_layers)] for _ in range(n_post)]
    best, best_score = None, float("inf")
    for l in range(n_layers):
        for p in range(n_post):
            if skipped[p][l]:
                reasons[p][l] = skipped[p][l]
            elif not float(harm[p, l]) > floor:
                reasons[p][l] = "harmful"
            elif not float(kl[p, l]) < kl_max:
                reasons[p][l] = "kl"
            else:
                reasons[p][l] = "ok"
                if float(fr[p, l]) < best_score:
                    best, best_score = (p, l), float(fr[p, l])
    if best is not None:
        reasons[best[0]][best[1]] = "chosen"
    return reasons, best


def _skipped(candidates: torch.Tensor, cfg: OverrefusalConfig) -> list[list[str]]:
    """Why a candidate is not scored: zero (layer 0 at template tokens), a late layer, or the stride."""
    n_post, n_layers, _ = candidates.shape
    norms = candidates.norm(dim=-1)  # [n_post, L]
    nonzero = norms > 1e-6 * float(norms.max().clamp_min(1e-30))
    max_layer = int(n_layers * cfg.max_layer_frac)
    out = [["" for _ in range(n_layers)] for _ in range(n_post)]
    for p in range(n_post):
        for l in range(n_layers):
            if not nonzero[p, l]:
                out[p][l] = "zero"
            elif l >= max_layer:
                out[p][l] = "layer"
            elif l % cfg.layer_stride:
                out[p][l] = "stride"
    return out


def select_false_refusal(
    scorer: FalseRefusalScorer,
    candidates: torch.Tensor,
    threshold: float,
    cfg: OverrefusalConfig = OverrefusalConfig(),
    progress: bool = True,
) -> FalseRefusalSelection:
    """Score every eligible candidate ``[n_post, L, d]`` (``cfg.chunk`` per batched pass group) and choose
    (module docstring). ``threshold``: the run's refusal threshold (score (b)'s floor)."""
    n_post, n_layers, _ = candidates.shape
    skipped = _skipped(candidates, cfg)
    todo = [(p, l) for l in range(n_layers) for p in range(n_post) if not skipped[p][l]]
    tables = [torch.full((n_post, n_layers), float("nan")) for _ in range(3)]  # (a), (b), (c)
    for i in tqdm(range(0, len(todo), cfg.chunk), desc="false refusal", disable=not progress, leave=False):
        part = todo[i : i + cfg.chunk]
        units = torch.stack([candidates[p, l] / candidates[p, l].norm() for p, l in part]).float()
        for table, s in zip(tables, scorer.scores(units)):
            for j, (p, l) in enumerate(part):
                table[p, l] = s[j]
    floor = harmful_floor(scorer.baseline["harmful"], threshold, cfg.harmful_margin)
    fr, harm, kl = tables
    reasons, chosen = choose_false_refusal(fr, harm, kl, skipped, floor, cfg.kl_threshold)
    return FalseRefusalSelection(
        fr, harm, kl, reasons, chosen, dict(scorer.baseline), floor, cfg.kl_threshold
    )
