"""COSMIC selection (Siu et al. 2025): choose the direction by cosine similarity of activations alone.

No refusal tokens and no generations: a candidate is good when ablating it makes harmful prompts'
last-position activations look like harmless ones, and adding it makes harmless prompts look harmful.
As COSMIC defines it:

* evaluation layers: the 10% of layers (at least one) whose last-position output means of harmful and
  harmless *training* prompts have the lowest cosine similarity;
* baseline vectors: the unit mean over prompts and evaluation layers of the last-position outputs of
  the harmful and of the harmless *validation* prompts;
* ``refusal`` score: cosine of the same mean for harmful prompts with r̂ ablated everywhere with the
  harmless baseline vector; ``steering`` score: cosine of the mean for harmless prompts with r added at
  the candidate's layer with the harmful baseline vector;
* filters as the paper's (layers < 0.8 L, KL < threshold on harmless prompts) plus COSMIC's own: at the
  last position, layers past the median peak layer of both scores at the other positions are skipped;
* the highest ``refusal + steering`` wins. KL is computed lazily in score order, like refdir's selector.
"""

from __future__ import annotations

import contextlib
import math

import torch
from tqdm.auto import tqdm

from refdir.core.adapter import first_tensor, get_adapter
from refdir.core.prefix import last_logits_shared, split_prefix
from refdir.core.templates import Batch
from refdir.core.types import Model
from refdir.method.interventions import activation_addition, directional_ablation, hooks
from refdir.method.selection import Scorer, SelectionResult
from refdir.run.settings import SelectionConfig


@torch.no_grad()
def last_outputs(model: Model, batch: Batch, layers: list[int], ctx=contextlib.nullcontext) -> torch.Tensor:
    """Last-position output of each of ``layers`` ``[N, len(layers), d]`` (float64, CPU) under ``ctx()``."""
    ad = get_adapter(model)
    pb = split_prefix(batch, True, model)
    out = torch.zeros(batch.input_ids.shape[0], len(layers), ad.d_model, dtype=torch.float64)

    @contextlib.contextmanager
    def record(idx, sub):
        def make(j):
            def hook(mod, args, o):
                out[idx, j] = first_tensor(o)[:, -1].double().cpu()

            return hook

        with hooks([ad.layers[l].register_forward_hook(make(j)) for j, l in enumerate(layers)]):
            yield

    with ctx():
        last_logits_shared(model, pb, on_bucket=record)
    return out


def evaluation_layers(
    model: Model, harmful_train: Batch, harmless_train: Batch, fraction: float = 0.1
) -> list[int]:
    """The ``fraction`` of layers where harmful and harmless last-position output means differ most in
    angle."""
    n = get_adapter(model).n_layers
    every = list(range(n))
    mh = last_outputs(model, harmful_train, every).mean(0)  # [L, d]
    ml = last_outputs(model, harmless_train, every).mean(0)
    cos = torch.nn.functional.cosine_similarity(mh, ml, dim=-1)
    return sorted(torch.argsort(cos)[: max(1, int(fraction * n))].tolist())


def _unit_mean(x: torch.Tensor) -> torch.Tensor:
    m = x.mean(dim=(0, 1))
    return m / m.norm().clamp_min(1e-30)


def _median_peak(t: torch.Tensor) -> float:
    """COSMIC's last-position cut: the median over the other positions of the layer where the score
    ``t`` ``[n_post, L]`` peaks (all L layers pass with one position only)."""
    n_post, n_layers = t.shape
    peaks = (
        [int(torch.nan_to_num(row, nan=-math.inf).argmax()) for row in t[:-1]] if n_post > 1 else [n_layers]
    )
    return float(torch.tensor(peaks, dtype=torch.float64).median())


def _cosine_scores(
    model: Model,
    candidates: torch.Tensor,
    todo: list[tuple[int, int]],
    harmful_val: Batch,
    harmless_val: Batch,
    layers: list[int],
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``refusal`` and ``steering`` cosine scores ``[n_post, L]`` of the candidates ``todo`` (NaN
    elsewhere): ablated harmful means against the harmless baseline, added harmless means against the
    harmful baseline, over the evaluation ``layers``."""
    base_harmful = _unit_mean(last_outputs(model, harmful_val, layers))  # [d]
    base_harmless = _unit_mean(last_outputs(model, harmless_val, layers))
    refusal = torch.full(candidates.shape[:2], float("nan"))
    steering = torch.full(candidates.shape[:2], float("nan"))
    for p, l in tqdm(todo, desc="select (cosmic)", disable=not progress, leave=False):
        r = candidates[p, l]
        abl = last_outputs(model, harmful_val, layers, lambda: directional_ablation(model, r))
        add = last_outputs(model, harmless_val, layers, lambda: activation_addition(model, r, l))
        refusal[p, l] = float(_unit_mean(abl) @ base_harmless)
        steering[p, l] = float(_unit_mean(add) @ base_harmful)
    return refusal, steering


def _choose(
    scorer: Scorer,
    candidates: torch.Tensor,
    norms: torch.Tensor,
    ranked: list[tuple[float, int, int]],
    kl: torch.Tensor,
    reasons: list[list[str]],
    kl_threshold: float,
) -> tuple[int, int] | None:
    """The highest-scoring candidate of ``ranked`` (score, p, l) under the KL threshold: KL (into ``kl``,
    of the unit candidate, ``norms`` ``[n_post, L]``) is computed in score order until one passes; the
    reasons of the rest are set in ``reasons``."""
    best = None
    for s, p, l in sorted(ranked, reverse=True):
        if best is not None:
            reasons[p][l] = "pruned"  # KL not needed: a better-scoring candidate already passed
            continue
        u = candidates[p, l] / norms[p, l]
        kl[p, l] = float(scorer.kl(u[None])[0])
        if kl[p, l] < kl_threshold:
            best = (p, l)
            reasons[p][l] = "chosen"
        else:
            reasons[p][l] = "kl"
    return best


def select_direction_cosmic(
    model: Model,
    candidates: torch.Tensor,
    harmful_val: Batch,
    harmless_val: Batch,
    harmful_train: Batch,
    harmless_train: Batch,
    cfg: SelectionConfig = SelectionConfig(),
    progress: bool = True,
) -> SelectionResult:
    """Score candidates ``[n_post, L, d]`` by COSMIC's cosine criteria and choose one (see the module
    docstring).

    In the result, ``bypass`` holds the ``refusal`` cosine score, ``induce`` the ``steering`` one (both:
    higher is better) and ``baseline`` the evaluation layers."""
    n_post, n_layers, _ = candidates.shape
    layers = evaluation_layers(model, harmful_train, harmless_train)
    norms = candidates.norm(dim=-1)
    nonzero = norms > 1e-6 * float(norms.max().clamp_min(1e-30))
    max_layer = int(n_layers * cfg.max_layer_frac)
    todo = [
        (p, l)
        for l in range(n_layers)
        for p in range(n_post)
        if nonzero[p, l] and (cfg.exhaustive or l < max_layer)
    ]
    refusal, steering = _cosine_scores(model, candidates, todo, harmful_val, harmless_val, layers, progress)
    # COSMIC's last-position rule: past the median peak layer of both scores at the other positions
    cut_refusal, cut_steering = _median_peak(refusal), _median_peak(steering)
    scorer = Scorer(model, harmful_val, harmless_val, None, cfg)
    reasons = [["" for _ in range(n_layers)] for _ in range(n_post)]
    ranked = []
    for p in range(n_post):
        for l in range(n_layers):
            if not nonzero[p, l]:
                reasons[p][l] = "zero"
            elif l >= max_layer:
                reasons[p][l] = "layer"
            elif p == n_post - 1 and l > cut_refusal and l > cut_steering:
                reasons[p][l] = "peak"
            else:
                ranked.append((float(refusal[p, l] + steering[p, l]), p, l))
    kl = torch.full((n_post, n_layers), float("nan"))
    best = _choose(scorer, candidates, norms, ranked, kl, reasons, cfg.kl_threshold)
    return SelectionResult(
        refusal,
        steering,
        kl,
        torch.full((n_post, n_layers), float("nan")),
        reasons,
        best,
        {"selector": "cosmic", "evaluation_layers": layers, "peak_cut": [cut_refusal, cut_steering]},
    )
