"""Refusal cones: how much of refusal one direction carries (Wollschläger et al. 2025, "The Geometry of
Refusal").

Rank 1 is the run's direction r̂. Rank k+1 adds the vector, orthogonal to the rank-k basis, whose
addition to the ablated subspace lowers the bypass score (the refusal metric on harmful validation
prompts) most. Candidates come from the run's own data: the principal components of the per-prompt
harmful activations minus the harmless mean at the direction's layer and position (with the basis
projected out), and the other difference-of-means candidates (every layer and position) orthogonalized
against the basis. Each rank is then evaluated like the paper's ablation condition: refusal rate of
greedy completions on the run's harmful evaluation prompts (substring judge) and first-token KL on its
harmless evaluation prompts, every number with its n.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from refdir.core.adapter import get_adapter
from refdir.core.errors import RefdirError
from refdir.core.forward import last_logits_shared, split_prefix
from refdir.core.io import load_tensors, save_tensors, write_json
from refdir.core.types import Model, Tokenizer
from refdir.evaluation.conditions import generate_judged, refusal_rate
from refdir.method.activations import read_resid_pre
from refdir.method.interventions import orthonormal_basis, subspace_ablation
from refdir.method.refusal import last_logits, last_logits_with_grad, refusal_metric
from refdir.method.selection import kl_divergence
from refdir.run.folder import RunFolder

if TYPE_CHECKING:
    from refdir.core.runtime import Runtime
    from refdir.method.directions import Direction


@torch.no_grad()
def per_prompt_activations(model: Model, batch, layer: int, pos: int, batch_size: int = 32) -> torch.Tensor:
    """resid_pre at ``layer`` and post-instruction position ``pos`` (from the end) of every prompt
    ``[N, d]`` (float64, CPU)."""
    out = []
    for i in range(0, batch.input_ids.shape[0], batch_size):
        ids, mask = batch.input_ids[i : i + batch_size], batch.attention_mask[i : i + batch_size]
        read_resid_pre(model, ids, mask, [layer], lambda _, x: out.append(x[:, pos].double().cpu()))
    return torch.cat(out)


def candidate_pool(
    model: Model,
    candidates: torch.Tensor,
    harmful_train,
    harmless_train,
    layer: int,
    pos_index: int,
    n_components: int = 8,
) -> list[tuple[str, torch.Tensor]]:
    """(name, vector) pairs: principal components of harmful-minus-harmless-mean activations at the
    direction's layer and position, then every other difference-of-means candidate."""
    n_post = candidates.shape[0]
    pos = pos_index - n_post  # from the end
    xh = per_prompt_activations(model, harmful_train, layer, pos)
    xl = per_prompt_activations(model, harmless_train, layer, pos)
    diffs = xh - xl.mean(0)  # [N, d]
    r = candidates[pos_index, layer].double()
    r = r / r.norm()
    diffs = diffs - (diffs @ r)[:, None] * r  # the direction itself is rank 1 already
    _, _, vt = torch.linalg.svd(diffs - diffs.mean(0), full_matrices=False)
    pool = [(f"pc{i + 1}@L{layer}", vt[i]) for i in range(min(n_components, vt.shape[0]))]
    pool += [
        (f"dim@L{l},pos{p - n_post}", candidates[p, l].double())
        for l in range(candidates.shape[1])
        for p in range(n_post)
        if (p, l) != (pos_index, layer) and candidates[p, l].norm() > 1e-6
    ]
    return pool


class _SubspaceKL:
    """Mean first-token KL(baseline || span(basis) ablated) on fixed harmless prompts (baseline run once)."""

    def __init__(self, model: Model, harmless):
        self.model, self.pb = model, split_prefix(harmless, True, model)
        self.base_logp = torch.log_softmax(last_logits_shared(model, self.pb).double(), -1)  # [N, V]

    @torch.no_grad()
    def __call__(self, basis: torch.Tensor) -> float:
        with subspace_ablation(self.model, basis):
            return float(kl_divergence(self.base_logp, last_logits_shared(self.model, self.pb)).mean())


def _within_kl(scored: list[tuple], kl_of, limit: float) -> tuple[tuple, dict]:
    """The first of ``scored`` (sorted by bypass) whose ablation KL is <= ``limit``, lazily; the lowest-KL
    one if none is. Returns it and the entry's KL fields."""
    seen: list[tuple[float, tuple]] = []
    for item in scored:
        kl = kl_of(item[2])
        if kl <= limit:
            return item, {"kl": kl, "kl_limit": limit, "kl_checked": len(seen) + 1}
        seen.append((kl, item))
    kl, item = min(seen, key=lambda x: x[0])
    return item, {"kl": kl, "kl_limit": limit, "kl_checked": len(seen), "over_kl_budget": True}


def _refined(model: Model, entry: dict, basis: torch.Tensor, pb, ids: torch.Tensor, refine: dict) -> dict:
    """The greedy rank's new vector refined by gradient (``refine``: :func:`refine_direction`'s options and
    the ``harmful``/``harmless`` batches); kept only when it lowers the bypass score on the full validation
    set (the greedy choice otherwise), and the entry says which."""
    t = time.time()
    opts = {k: v for k, v in refine.items() if k not in ("harmful", "harmless", "refusal_ids")}
    v, hist = refine_direction(
        model, basis, entry["basis"][-1], refine["harmful"], refine["harmless"], ids.tolist(), **opts
    )
    trial = torch.cat([basis, v[None]])
    b = subspace_bypass(model, pb, trial, ids)
    how = f"gradient refinement, {len(hist)} steps in {time.time() - t:.0f} s"
    if b < entry["bypass"]:
        return {
            **entry,
            "basis": orthonormal_basis(trial),
            "bypass": b,
            "added": f"{entry['added']} + {how}",
            "refine_loss": [hist[0], hist[-1]] if hist else None,
        }
    return {**entry, "added": f"{entry['added']} ({how} did not lower bypass: {b:.3f})"}


@torch.no_grad()
def subspace_bypass(model: Model, pb, basis: torch.Tensor, refusal_ids: torch.Tensor) -> float:
    """Mean refusal metric on the prompts of ``pb`` with ``span(basis)`` ablated."""
    with subspace_ablation(model, basis):
        return float(refusal_metric(last_logits_shared(model, pb), refusal_ids).mean())


def greedy_cone(
    model: Model,
    candidates: torch.Tensor,
    direction,
    harmful_val,
    harmful_train,
    harmless_train,
    refusal_ids: list[int],
    max_rank: int,
    pool_size: int = 24,
    progress: bool = True,
    refine: dict | None = None,
    kl_budget: float | None = None,
    harmless_val=None,
) -> list[dict]:
    """Rank-1..``max_rank`` bases, greedily by bypass; each entry: basis ``[k, d]``, the added vector's name,
    and the bypass score. The pool: the principal components, then the other candidates, the latter
    the ``pool_size`` least aligned with r̂ (each round scores every pool vector).

    Bypass alone happily adds a vector that breaks the model (on the 0.5B, rank 2 took an early-layer
    candidate at a first-token KL of 1.08): with ``kl_budget``, a round takes the lowest-bypass vector whose
    ablation keeps the first-token KL on ``harmless_val`` within ``kl_budget`` of the current basis's,
    checked lazily in bypass order like the paper's selection filter (the lowest-KL vector, marked, when
    none fits)."""
    n_post = candidates.shape[0]
    pos_index = n_post + direction.pos if direction.pos < 0 else direction.pos
    ids = torch.tensor(refusal_ids)
    pb = split_prefix(harmful_val, True, model)
    r = direction.vector.double() / direction.vector.double().norm()
    ranks = [
        {
            "rank": 1,
            "basis": r[None],
            "added": "the run's direction",
            "bypass": subspace_bypass(model, pb, r[None], ids),
        }
    ]
    pool = candidate_pool(model, candidates, harmful_train, harmless_train, direction.layer, pos_index)
    pcs = [(n, v) for n, v in pool if n.startswith("pc")]
    dims = [(n, v) for n, v in pool if not n.startswith("pc")]
    # pre-rank the (many) other candidates by their rank-2 bypass with r̂, keep the best
    if len(dims) > pool_size:
        cos = torch.stack([torch.nn.functional.cosine_similarity(v, r, dim=0).abs() for _, v in dims])
        dims = [dims[i] for i in torch.argsort(cos).tolist()[:pool_size]]  # the least aligned with r̂ first
    pool = pcs + dims
    kl_of = None
    if kl_budget is not None:
        if harmless_val is None:
            raise ValueError("kl_budget needs harmless_val prompts")
        kl_of = _SubspaceKL(model, harmless_val)
        ranks[0]["kl"] = kl_of(ranks[0]["basis"])
    bar = tqdm(total=max(0, max_rank - 1) * len(pool), desc="cone", disable=not progress, leave=False)
    for k in range(2, max_rank + 1):
        basis = ranks[-1]["basis"]
        scored = []  # (bypass, name, trial basis)
        for name, v in pool:
            v = v - (basis @ v) @ basis  # orthogonal to the basis
            if v.norm() >= 1e-6 * max(1.0, float(v.abs().max())):
                trial = torch.cat([basis, (v / v.norm())[None]])
                scored.append((subspace_bypass(model, pb, trial, ids), name, trial))
            bar.update(1)
        if not scored:
            break
        scored.sort(key=lambda x: x[0])
        best = scored[0]
        extra: dict[str, Any] = {}
        if kl_of is not None:
            best, extra = _within_kl(scored, kl_of, ranks[-1]["kl"] + kl_budget)
        entry = {"rank": k, "basis": orthonormal_basis(best[2]), "added": best[1], "bypass": best[0], **extra}
        if refine is not None:
            entry = _refined(model, entry, basis, pb, ids, refine)
            if kl_of is not None:
                entry["kl"] = kl_of(entry["basis"])  # the refined basis's own KL sets the next limit
        ranks.append(entry)
        pool = [(n, v) for n, v in pool if n != best[1]]
    bar.close()
    return ranks


def refine_direction(
    model: Model,
    basis: torch.Tensor,
    init: torch.Tensor,
    harmful,
    harmless,
    refusal_ids: list[int],
    time_budget: float = 300.0,
    max_steps: int = 200,
    lr: float = 0.02,
    kl_weight: float = 1.0,
    rows: int = 8,
    seed: int = 0,
) -> tuple[torch.Tensor, list[float]]:
    """Gradient refinement of the cone's next vector (Wollschläger et al.'s ablation and retain losses).

    Optimizes a unit vector v orthogonal to ``basis`` ``[k, d]`` so that ablating span(basis, v) minimizes
    the refusal log-odds on ``harmful`` prompts (their *ablation* loss, with refdir's refusal tokens in place
    of target completions) plus ``kl_weight`` x the first-token KL from the baseline on ``harmless`` ones
    (their *retain* loss). Their addition loss is left out: a cone vector need not induce refusal alone.
    Adam on a free vector, projected onto the complement of ``basis`` and normalized every step; mini-batches
    of ``rows`` prompts per side; stops at ``max_steps`` or ``time_budget`` seconds. Returns v ``[d]``
    (float64) and the loss per step."""
    ids = torch.tensor(refusal_ids)
    basis = basis.double()
    g = torch.Generator().manual_seed(seed)
    base = last_logits(model, harmless.input_ids, harmless.attention_mask)  # [N, V], no grad: the target
    base_logp = torch.log_softmax(base.double(), -1)
    w = (init.double() - basis.T @ (basis @ init.double())).clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr * float(w.detach().norm()))
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)  # only v learns: no weight gradients
    history: list[float] = []
    t0 = time.time()
    try:
        for _ in range(max_steps):
            if time.time() - t0 > time_budget:
                break
            hi = torch.randperm(harmful.input_ids.shape[0], generator=g)[:rows]
            li = torch.randperm(harmless.input_ids.shape[0], generator=g)[:rows]
            v = w - basis.T @ (basis @ w)
            trial = torch.cat([basis, (v / v.norm())[None]])
            with subspace_ablation(model, trial):
                bypass = refusal_metric(
                    last_logits_with_grad(model, harmful.input_ids[hi], harmful.attention_mask[hi]), ids
                ).mean()
                kl = kl_divergence(
                    base_logp[li],
                    last_logits_with_grad(model, harmless.input_ids[li], harmless.attention_mask[li]),
                ).mean()
            loss = bypass.double() + kl_weight * kl.double()
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append(float(loss.detach()))
    finally:
        for p in frozen:
            p.requires_grad_(True)
    with torch.no_grad():
        v = w.detach() - basis.T @ (basis @ w.detach())
    return v / v.norm(), history


def _method(r: dict) -> str:
    """How a rank's basis was built, for the table."""
    if r["rank"] == 1:
        return "run direction"
    if "kl_limit" not in r:
        return f"greedy by bypass: + {r['added']}"
    over = " (none fit: lowest KL)" if r.get("over_kl_budget") else ""
    return f"greedy by bypass, KL <= {r['kl_limit']:.3g}{over}: + {r['added']}"


@torch.no_grad()
def evaluate_ranks(
    model: Model,
    tok: Tokenizer,
    ranks: list[dict],
    harmful: list[str],
    harmless: list[str],
    fmt,
    max_new_tokens: int,
    gen_rows: int,
) -> list[dict]:
    """Refusal rate (greedy, substring judge) on ``harmful`` and first-token KL on ``harmless`` per rank."""
    from refdir.core.templates import tokenize_prompts

    kl_of = _SubspaceKL(model, tokenize_prompts(tok, harmless, fmt, get_adapter(model).device))
    out = []
    for r in ranks:
        t = time.time()
        with subspace_ablation(model, r["basis"]):
            items = generate_judged(
                model, tok, harmful, [None] * len(harmful), fmt, max_new_tokens, gen_rows, f"rank {r['rank']}"
            )
        kl = kl_of(r["basis"])
        out.append(
            {
                "rank": r["rank"],
                "refusal_rate": refusal_rate(items),
                "kl": round(kl, 6),
                "n": len(harmful),
                "n_kl": len(harmless),
                "bypass": round(r["bypass"], 6),
                "method": _method(r),
                "seconds": round(time.time() - t, 1),
            }
        )
    return out


@dataclass(frozen=True)
class ConeSettings:
    """What :func:`measure_cone` measures: ranks 1..``max_rank``, each judged on greedy completions of
    ``max_new_tokens``; ``refine``: each added vector refined by gradient (at most ``refine_steps`` steps or
    ``refine_time_budget`` seconds per rank); ``kl_budget``: each added vector may raise the first-token KL
    on the run's harmless validation prompts by at most this much (None: greedy by bypass alone)."""

    max_rank: int = 4
    max_new_tokens: int = 64
    refine: bool = False
    refine_time_budget: float = 300.0
    refine_steps: int = 200
    kl_budget: float | None = None


def measure_cone(
    run: RunFolder,
    rt: Runtime,
    direction: Direction,
    settings: ConeSettings,
    harmful: list[str] | None = None,
    out: Path | None = None,
) -> dict:
    """The refusal cone of a run: greedy bases of rank 1..K from its candidates and training prompts,
    each evaluated on ``harmful`` (default: the run's harmful evaluation prompts) and the run's harmless
    evaluation prompts. Writes ``cone.json`` and the last basis ``cone.safetensors`` into the run folder
    (and the result to ``out`` when given); returns the result."""
    if not run.candidates.is_file():
        raise RefdirError(
            f"{run.path} has no candidates.safetensors: run `refdir extract --out {run.path}` first"
        )
    data = json.loads(run.prompts.read_text())
    cands = load_tensors(run.candidates)["directions"]  # [P, L, d]
    ins = lambda split: rt.encode([x["instruction"] for x in data[split]])  # noqa: E731
    t = time.time()
    refine = None
    if settings.refine:  # gradients on the training prompts, acceptance on the validation ones
        refine = {
            "harmful": ins("harmful_train"),
            "harmless": ins("harmless_train"),
            "time_budget": settings.refine_time_budget,
            "max_steps": settings.refine_steps,
        }
    model, tok = rt.model, rt.tokenizer
    ranks = greedy_cone(
        model,
        cands,
        direction,
        ins("harmful_val"),
        ins("harmful_train"),
        ins("harmless_train"),
        data["refusal_tokens"]["token_ids"],
        settings.max_rank,
        refine=refine,
        kl_budget=settings.kl_budget,
        harmless_val=ins("harmless_val") if settings.kl_budget is not None else None,
    )
    harmful = harmful or [x["instruction"] for x in data["eval_harmful"]]
    harmless = [x["instruction"] for x in data["eval_harmless"]]
    rows = evaluate_ranks(
        model, tok, ranks, harmful, harmless, rt.fmt, settings.max_new_tokens, rt.batch.gen_rows
    )
    res = {
        "model": rt.spec,
        "direction": {"layer": direction.layer, "pos": direction.pos},
        "ranks": rows,
        "judge": "substring (paper)",
        "max_new_tokens": settings.max_new_tokens,
        "seconds": round(time.time() - t, 1),
    }
    basis = ranks[-1]["basis"].float().contiguous()  # [K, d]
    save_tensors(run.cone_basis, {"basis": basis}, metadata={"model": str(rt.spec)})
    if out is not None:
        write_json(out, res)
    write_json(run.cone, res)
    return res
