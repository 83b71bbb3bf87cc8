"""Select the refusal direction among the candidates (paper §2.3, App. C).

For each candidate ``r[p, l]``:

* ``bypass``: mean refusal metric on harmful validation prompts with r̂ ablated everywhere;
* ``induce``: mean refusal metric on harmless validation prompts with r added at layer l;
* ``kl``: KL(baseline || ablated) of the next-token distribution on harmless prompts.

Filters: l < 0.8·L, KL < 0.1, induce > 0; the lowest bypass wins.

Speed (issue: performance). Candidates are scored many per forward pass (one direction per
batch row); only the last position is unembedded; harmful and harmless prompts can share one
ablated pass; induce runs only layers >= l on a cached prefix. With ``prune`` (default), a
*linear screen* orders all candidates at the cost of one forward+backward pass: to first order,
ablating r̂ from every residual write w changes the refusal metric m by ``-r̂ᵀ M r̂`` with
``M = Σ w (∂m/∂w)ᵀ`` summed over writes, positions and prompts (attribution patching). Full
bypass scores are then computed in screen order, a chunk at a time, and KL/induce lazily in
bypass order until a candidate passes every filter. ``exhaustive`` scores everything.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from refdir.core.adapter import get_adapter
from refdir.core.errors import RefdirError
from refdir.core.prefix import (
    FORWARD_OVERHEAD_TOKENS,
    PrefixBatch,
    expand,
    forward_rest,
    last_logits_shared,
    length_buckets,
    per_trial_last_logits,
    prefix_cache,
    split_prefix,
)
from refdir.core.templates import Batch
from refdir.core.types import Model
from refdir.method.activations import recording_resid_pre
from refdir.method.interventions import activation_addition, directional_ablation, start_at_layer
from refdir.method.refusal import position_ids, refusal_metric
from refdir.run.settings import SelectionConfig  # noqa: F401  (re-exported: refdir.SelectionConfig)


@dataclass
class SelectionResult:
    bypass: torch.Tensor  # [n_post, L], NaN where not scored
    induce: torch.Tensor
    kl: torch.Tensor
    screen: torch.Tensor  # screened bypass [n_post, L], NaN where not screened
    reasons: list[list[str]]  # [n_post][L]: "chosen", "ok", "layer", "kl", "induce", "pruned"
    chosen: tuple[int, int] | None  # (pos_index, layer)
    baseline: dict = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for row in self.reasons:
            for r in row:
                out[r] = out.get(r, 0) + 1
        return out

    def to_json(self) -> dict:
        def clean(t: torch.Tensor) -> list:
            return [[None if math.isnan(v) else round(float(v), 6) for v in row] for row in t.tolist()]

        return {
            "bypass": clean(self.bypass),
            "induce": clean(self.induce),
            "kl": clean(self.kl),
            "screen": clean(self.screen),
            "reasons": self.reasons,
            "chosen": self.chosen,
            "baseline": self.baseline,
            "counts": self.counts(),
        }


def concat_batches(a: Batch, b: Batch) -> Batch:
    """Stack two left-padded batches into one (re-padding on the left)."""
    t = max(a.input_ids.shape[1], b.input_ids.shape[1])

    def pad(x: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(x, (t - x.shape[1], 0), value=value)

    return Batch(
        torch.cat([pad(a.input_ids, 0), pad(b.input_ids, 0)]),  # pad ids are masked out
        torch.cat([pad(a.attention_mask, 0), pad(b.attention_mask, 0)]),
        min(a.n_post, b.n_post),
    )


def _acc_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def kl_divergence(base_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(P_base || P) per row; ``base_logp`` and ``logits`` ``[N, V]``."""
    logp = torch.log_softmax(logits.double(), -1)
    return (base_logp.exp() * (base_logp - logp)).sum(-1).float()


class Scorer:
    """Holds the validation batches, their baselines and the per-layer prefix cache."""

    def __init__(
        self,
        model: Model,
        harmful: Batch,
        harmless: Batch,
        refusal_ids: list[int] | None,
        cfg: SelectionConfig,
    ):
        """``refusal_ids`` None: KL only (selectors that need no refusal tokens)."""
        self.model, self.cfg = model, cfg
        self.ad = get_adapter(model)
        self.ids = torch.tensor(refusal_ids or [0])  # CPU: refusal_metric moves it to the logits' device
        self.harmful, self.harmless = harmful, harmless
        self.n_harm = harmful.input_ids.shape[0]
        self.p_harmful, self.p_harmless = (
            split_prefix(harmful, True, model),
            split_prefix(harmless, True, model),
        )
        self.p_both = split_prefix(concat_batches(harmful, harmless), True, model)
        # the harmless baseline pass also records the residual stream entering every layer, where induce
        # starts (rest tokens only; ~7 MB per layer for 32 prompts of the 1.5B model)
        self._resid: dict[int, torch.Tensor] = {}  # layer -> [N, T, d] in p_harmless's rest layout
        base_harmless = last_logits_shared(
            model, self.p_harmless, on_bucket=self._recorder(range(self.ad.n_layers))
        )
        self.base_logp = torch.log_softmax(base_harmless.double(), -1)  # [N, V]
        if refusal_ids is None:
            self.baseline = {}
            return
        base_harmful = last_logits_shared(model, self.p_harmful)
        self.baseline = {
            "harmful_refusal_metric": float(refusal_metric(base_harmful, self.ids).mean()),
            "harmless_refusal_metric": float(refusal_metric(base_harmless, self.ids).mean()),
        }

    def _recorder(self, layers):
        """``on_bucket`` context for the harmless baseline pass: fills ``self._resid`` bucket by bucket."""
        n, t = self.p_harmless.input_ids.shape

        @contextlib.contextmanager
        def on_bucket(idx: torch.Tensor, sub: PrefixBatch):
            with recording_resid_pre(self.model, layers) as seen:
                yield
            for l, x in seen.items():  # x [m, T_sub, d]: the last T_sub columns of the full rest
                if l not in self._resid:
                    self._resid[l] = x.new_zeros(n, t, x.shape[-1])
                self._resid[l][idx, t - x.shape[1] :] = x

        return on_bucket

    def ablation(self, units: torch.Tensor, pb: PrefixBatch) -> torch.Tensor:
        """Last-position logits with a different unit direction per candidate: ``[K, n, V]``."""
        return per_trial_last_logits(
            self.model,
            pb,
            units.shape[0],
            self.cfg.batch_rows,
            lambda t: directional_ablation(self.model, units[t]),
        )

    def bypass_kl(self, units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bypass ``[K]`` and KL ``[K]`` from one shared ablated pass over harmful + harmless prompts."""
        logits = self.ablation(units, self.p_both)  # [K, Nh + Nl, V]
        bypass = torch.stack([refusal_metric(x[: self.n_harm], self.ids).mean() for x in logits])
        kl = torch.stack([kl_divergence(self.base_logp, x[self.n_harm :]).mean() for x in logits])
        return bypass.cpu(), kl.cpu()

    def bypass(self, units: torch.Tensor) -> torch.Tensor:
        """Full bypass score ``[K]``: mean refusal metric on harmful prompts with r̂ ablated."""
        return torch.stack(
            [refusal_metric(x, self.ids).mean() for x in self.ablation(units, self.p_harmful)]
        ).cpu()

    def kl(self, units: torch.Tensor) -> torch.Tensor:
        """KL(baseline || ablated) ``[K]`` on the harmless prompts' next-token distribution."""
        return torch.stack(
            [kl_divergence(self.base_logp, x).mean() for x in self.ablation(units, self.p_harmless)]
        ).cpu()

    def linear_screen(self, units: torch.Tensor, max_tokens: int = 128) -> torch.Tensor:
        """First-order estimate of the bypass score of every candidate ``[K]`` from one backward pass.

        Backward keeps every layer's intermediates: ~4 MB per token for the 1.5B model, so batches
        hold at most ``max_tokens`` tokens (padding included) to bound peak memory (~0.5 GB)."""
        ad = self.ad
        d = ad.d_model
        M: dict[torch.device, torch.Tensor] = {}  # per device of a device map: each write adds where it lives
        base = []
        acts: list[torch.Tensor] = []

        def keep(mod, args, out):
            t = out[0] if isinstance(out, tuple) else out
            if not t.requires_grad:
                t.requires_grad_(True)
            t.retain_grad()
            acts.append(t)

        handles = [m.register_forward_hook(keep) for m in [ad.embed] + ad.attn_write + ad.mlp_write]
        n = self.n_harm
        try:
            with torch.enable_grad():
                lengths = self.harmful.attention_mask.sum(-1).tolist()
                for g in length_buckets(lengths, max(1, max_tokens // max(lengths))):
                    acts.clear()
                    t = int(self.harmful.attention_mask[g].sum(-1).max())  # this bucket's width
                    ids, mask = self.harmful.input_ids[g, -t:], self.harmful.attention_mask[g, -t:]
                    out = self.model(
                        input_ids=ids,
                        attention_mask=mask,
                        position_ids=position_ids(mask),
                        use_cache=False,
                        logits_to_keep=1,
                    )
                    m = refusal_metric(out.logits[:, -1, :], self.ids)
                    base.append(m.detach())
                    m.sum().backward()
                    for a in acts:
                        if a.grad is not None:
                            if a.device not in M:
                                M[a.device] = torch.zeros(d, d, dtype=_acc_dtype(a.device), device=a.device)
                            acc = M[a.device]
                            acc += a.detach().reshape(-1, d).to(acc.dtype).T @ a.grad.reshape(-1, d).to(
                                acc.dtype
                            )
        finally:
            for h in handles:
                h.remove()
            acts.clear()
        u = units.double().cpu()
        total = sum(m.cpu().double() for m in M.values()) if M else torch.zeros(d, d, dtype=torch.float64)
        delta = -((u @ total) * u).sum(-1) / n  # [K]
        return (torch.cat(base).mean().double().cpu() + delta).float()

    def induce(self, vectors: torch.Tensor, layer: int) -> torch.Tensor:
        """Refusal metric on harmless prompts with each vector added at ``layer`` ``[K]``.

        Layers below ``layer`` are the baseline's: the rest tokens start at ``layer`` from the residual
        stream recorded by the baseline pass; the shared prefix (changed by the addition) runs whole,
        once per candidate, and its KV cache serves that candidate's rows."""
        pb = self.p_harmless
        n, t = pb.input_ids.shape
        per = max(1, self.cfg.batch_rows // n)
        groups = list(pb.buckets(n, overhead=max(1, FORWARD_OVERHEAD_TOKENS // per)))
        out = []
        for i in range(0, vectors.shape[0], per):
            v = vectors[i : i + per].float()  # [k, d]
            k = v.shape[0]
            with activation_addition(self.model, v, layer):
                head = prefix_cache(self.model, pb.prefix, rows=k)  # one row per candidate
            metric = torch.empty(k, n)
            for g, sub in groups:
                m, ts = g.shape[0], sub.input_ids.shape[1]
                base = self._resid[layer][g, t - ts :]  # on the device of layer ``layer``
                resid = base.repeat(k, 1, 1) + v.to(base.device).repeat_interleave(m, 0)[:, None, :]
                with start_at_layer(self.model, layer, resid):
                    logits = forward_rest(self.model, sub.repeat(k), expand(head, m)).logits[:, -1, :]
                metric[:, g] = refusal_metric(logits.float(), self.ids).view(k, m).cpu()
            out.append(metric.mean(1))
        return torch.cat(out)


@dataclass
class _ScoreTables:
    """The candidates' score tables ``[n_post, L]`` (NaN: not scored yet) and the scorer that fills them."""

    scorer: Scorer
    cfg: SelectionConfig
    candidates: torch.Tensor  # [n_post, L, d]
    units: torch.Tensor  # [n_post, L, d] the candidates as unit vectors
    bypass: torch.Tensor
    induce: torch.Tensor
    kl: torch.Tensor
    screen: torch.Tensor

    def score(self, cands: list[tuple[int, int]], what: tuple[str, ...]) -> None:
        """Fill the requested score tables for ``cands`` (induce grouped by layer for the prefix cache)."""
        if not cands:
            return
        u = torch.stack([self.units[p, l] for p, l in cands])  # [K, d]
        b: torch.Tensor | None
        k: torch.Tensor | None
        if "bypass" in what and "kl" in what:
            b, k = self.scorer.bypass_kl(u)
        else:
            b = self.scorer.bypass(u) if "bypass" in what else None
            k = self.scorer.kl(u) if "kl" in what else None
        for j, (p, l) in enumerate(cands):
            if b is not None:
                self.bypass[p, l] = b[j]
            if k is not None:
                self.kl[p, l] = k[j]
        if "induce" in what:
            for l in sorted({l for _, l in cands}):
                at = [p for p, ll in cands if ll == l]
                ind = self.scorer.induce(torch.stack([self.candidates[p, l] for p in at]), l)
                for j, p in enumerate(at):
                    self.induce[p, l] = ind[j]

    @property
    def induce_min(self) -> float:
        """The induce threshold. None means "calibrated on this model", which only the prompt screen can
        measure: ``refdir run`` and ``find_direction`` resolve it (``run.stages.selection_config``)."""
        if self.cfg.induce_threshold is None:
            raise RefdirError(
                "induce_threshold=None means the model's calibrated threshold, which the prompt screen "
                "measures: use refdir.find_direction, or pass a number (the paper's is 0.0)"
            )
        return self.cfg.induce_threshold

    def passes(self, p: int, l: int) -> bool:
        return bool(self.kl[p, l] < self.cfg.kl_threshold and self.induce[p, l] > self.induce_min)


def _score_every(tables: _ScoreTables, todo: list[tuple[int, int]], progress: bool) -> None:
    """Every score of every candidate in ``todo``, a chunk at a time (``exhaustive`` or no ``prune``)."""
    chunk = tables.cfg.chunk
    for i in tqdm(range(0, len(todo), chunk), desc="select", disable=not progress, leave=False):
        tables.score(todo[i : i + chunk], ("bypass", "kl", "induce"))


def _score_pruned(tables: _ScoreTables, eligible: list[tuple[int, int]], progress: bool) -> None:
    """The linear screen orders the candidates; full bypass scores follow in that order, a chunk at a time,
    and induce / KL lazily in bypass order until a candidate passes every filter."""
    cfg = tables.cfg
    sc = tables.scorer.linear_screen(torch.stack([tables.units[p, l] for p, l in eligible]))
    for j, (p, l) in enumerate(eligible):
        tables.screen[p, l] = sc[j]
    order = [eligible[j] for j in torch.argsort(sc).tolist()]
    done = False
    bar = tqdm(total=len(order), desc="select", disable=not progress, leave=False)
    for i in range(0, len(order), cfg.chunk):
        part = order[i : i + cfg.chunk]
        tables.score(part, ("bypass",))
        bar.update(len(part))
        # check the filters lazily, one candidate at a time in increasing bypass over everything
        # scored so far: induce first (cheap: only layers >= l run), KL only where induce passes;
        # the first candidate that passes both is the choice (batching them would score candidates
        # that a better one makes irrelevant: on the 1.5B, 8 induce runs where 3 decide)
        for c in sorted(order[: i + cfg.chunk], key=lambda c: float(tables.bypass[c])):
            if math.isnan(float(tables.induce[c])):
                tables.score([c], ("induce",))
            if tables.induce[c] > tables.induce_min and math.isnan(float(tables.kl[c])):
                tables.score([c], ("kl",))
            if tables.passes(*c):
                done = True
                break
        if done:
            break
    bar.total = bar.n  # pruning stopped early: the work is done, not 16/105 with an hour to go
    bar.refresh()
    bar.close()


def _reason(tables: _ScoreTables, p: int, l: int, nonzero: bool, max_layer: int) -> str:
    """Why candidate (p, l) is or is not eligible: "ok" or the filter that removed it."""
    cfg, bypass, induce, kl = tables.cfg, tables.bypass[p, l], tables.induce[p, l], tables.kl[p, l]
    if not nonzero:
        return "zero"
    if l >= max_layer:
        return "layer"
    if math.isnan(float(bypass)):
        return "pruned"
    if math.isnan(float(induce)):
        return "pruned"  # bypass known, but a better-bypass candidate already passed
    if not induce > tables.induce_min:
        return "induce"
    if math.isnan(float(kl)):
        return "pruned"
    if not kl < cfg.kl_threshold:
        return "kl"
    return "ok"


def _choose(
    tables: _ScoreTables, nonzero: torch.Tensor, max_layer: int
) -> tuple[list[list[str]], tuple[int, int] | None]:
    """Each candidate's reason ``[n_post][L]`` and the eligible one with the lowest bypass (its reason
    "chosen"), or None."""
    n_post, n_layers = tables.bypass.shape
    reasons = [["" for _ in range(n_layers)] for _ in range(n_post)]
    best, best_score = None, float("inf")
    for p, l in [(p, l) for l in range(n_layers) for p in range(n_post)]:
        reasons[p][l] = _reason(tables, p, l, bool(nonzero[p, l]), max_layer)
        if reasons[p][l] == "ok" and float(tables.bypass[p, l]) < best_score:
            best, best_score = (p, l), float(tables.bypass[p, l])
    if best is not None:
        reasons[best[0]][best[1]] = "chosen"
    return reasons, best


def select_direction(
    model: Model,
    candidates: torch.Tensor,
    harmful_val: Batch,
    harmless_val: Batch,
    refusal_ids: list[int],
    cfg: SelectionConfig = SelectionConfig(),
    progress: bool = True,
) -> SelectionResult:
    """Score candidates ``[n_post, L, d]`` and choose one (see the module docstring)."""
    n_post, n_layers, _ = candidates.shape
    scorer = Scorer(model, harmful_val, harmless_val, refusal_ids, cfg)
    nan = lambda: torch.full((n_post, n_layers), float("nan"))  # noqa: E731
    max_layer = int(n_layers * cfg.max_layer_frac)
    allc = [(p, l) for l in range(n_layers) for p in range(n_post)]
    norms = candidates.norm(dim=-1)  # [n_post, L]
    # layer-0 candidates at template positions are exactly zero (same tokens, same embeddings)
    nonzero = norms > 1e-6 * float(norms.max().clamp_min(1e-30))
    allc = [c for c in allc if nonzero[c]]
    eligible = [(p, l) for p, l in allc if l < max_layer]
    units = candidates / norms[..., None].clamp_min(1e-12)
    tables = _ScoreTables(scorer, cfg, candidates, units, nan(), nan(), nan(), nan())
    if cfg.exhaustive or not cfg.prune:
        _score_every(tables, allc if cfg.exhaustive else eligible, progress)
    else:
        _score_pruned(tables, eligible, progress)
    reasons, best = _choose(tables, nonzero, max_layer)
    return SelectionResult(
        tables.bypass, tables.induce, tables.kl, tables.screen, reasons, best, scorer.baseline
    )


def paper_scores(
    model: Model,
    candidates: torch.Tensor,
    p: int,
    l: int,
    harmful_val: Batch,
    harmless_val: Batch,
    refusal_ids: list[int],
    cfg: SelectionConfig = SelectionConfig(),
) -> dict:
    """The paper's bypass and induce scores (and baselines) of one candidate: how another selector's choice
    fares by the paper's measure."""
    scorer = Scorer(model, harmful_val, harmless_val, refusal_ids, cfg)
    r = candidates[p, l]
    return {
        "bypass": float(scorer.bypass((r / r.norm())[None])[0]),
        "induce": float(scorer.induce(r[None], l)[0]),
        **scorer.baseline,
    }


def explain_no_choice(result: SelectionResult) -> str:
    """One line saying which filter removed how many candidates."""
    c = result.counts()
    return (
        f"every candidate direction was filtered out: {c.get('layer', 0)} by layer >= 0.8L, "
        f"{c.get('kl', 0)} by KL >= threshold, {c.get('induce', 0)} by induce <= threshold, "
        f"{c.get('zero', 0)} zero; see selection.json for every score (relax with --induce-threshold or "
        "--kl-threshold, or use more training prompts)"
    )


def require_choice(result: SelectionResult) -> tuple[int, int]:
    if result.chosen is None:
        raise RefdirError(explain_no_choice(result))
    return result.chosen
