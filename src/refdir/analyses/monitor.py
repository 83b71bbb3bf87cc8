"""A refusal monitor: flag prompts by their projection onto r̂ (detection, not intervention).

The projection of the residual stream onto the refusal direction separates harmful from harmless
instructions; the paper (§5) shows adversarial suffixes suppress it at the last position. So scores are
read at every layer in several places — the direction's own post-instruction position, the last template
token, the instruction's last token (before any suffix) and the mean over the instruction's tokens — and
the sweep says where the monitor still works.

Threshold: at the direction's layer and read, the score that maximizes TPR − FPR (Youden's J) between
the run's harmful and harmless *training* prompts; AUROC and TPR at 1% FPR are measured on the run's
*evaluation* prompts (held out from training and selection).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from refdir.analyses.suffix_analysis import tokenize_with_suffix
from refdir.core.adapter import get_adapter
from refdir.core.io import write_json
from refdir.core.templates import PromptFormat
from refdir.core.types import Model, Tokenizer
from refdir.method.activations import read_resid_pre
from refdir.run.folder import RunFolder

if TYPE_CHECKING:
    from refdir.core.runtime import Runtime
    from refdir.method.directions import Direction

READS = ("direction", "last", "instruction_end", "instruction_mean")


@torch.no_grad()
def projection_scores(
    model: Model,
    tok: Tokenizer,
    instructions: list[str],
    direction: torch.Tensor,
    pos: int = -1,
    fmt: PromptFormat = PromptFormat(),
    suffixes: list[str] | None = None,
    batch_size: int = 32,
) -> dict[str, torch.Tensor]:
    """``{read: [N, L]}``: resid_pre · r̂ at every layer, read at the direction's position ``pos`` (from the
    end), the last token, the instruction's last token and the mean over the instruction's tokens."""
    ad = get_adapter(model)
    unit = (direction.double() / direction.double().norm()).float()
    out = {r: torch.zeros(len(instructions), ad.n_layers) for r in READS}
    for i in range(0, len(instructions), batch_size):
        sb = tokenize_with_suffix(
            tok, instructions[i : i + batch_size], suffixes[i : i + batch_size] if suffixes else None, fmt
        )
        imask = sb.instr_mask.float()  # [B, T]
        t = sb.input_ids.shape[1]
        end = (torch.arange(t)[None].expand_as(imask) * sb.instr_mask).max(-1).values  # [B] last instr. token
        rows = slice(i, i + sb.input_ids.shape[0])

        def read(layer: int, x: torch.Tensor) -> None:  # x: [B, T, d]
            proj = (x.float() @ unit.to(x.device)).cpu()  # [B, T]
            out["direction"][rows, layer] = proj[:, pos]
            out["last"][rows, layer] = proj[:, -1]
            out["instruction_end"][rows, layer] = proj[torch.arange(proj.shape[0]), end]
            out["instruction_mean"][rows, layer] = (proj * imask).sum(-1) / imask.sum(-1).clamp_min(1)

        read_resid_pre(model, sb.input_ids, sb.attention_mask, list(range(ad.n_layers)), read)
    return out


def auroc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(score of a harmful prompt > score of a harmless one), ties counting half (Mann-Whitney U)."""
    p, n = pos.double()[:, None], neg.double()[None, :]
    return float(((p > n).double() + 0.5 * (p == n).double()).mean())


def tpr_at_fpr(pos: torch.Tensor, neg: torch.Tensor, fpr: float = 0.01) -> float:
    """Fraction of harmful prompts flagged at the lowest threshold that flags at most ``fpr`` of the
    harmless."""
    allowed = int(fpr * len(neg))  # harmless prompts that may score above the threshold (0 of fewer than 100)
    t = torch.sort(neg.double(), descending=True).values[allowed] if allowed < len(neg) else float("-inf")
    return float((pos.double() > t).double().mean())


def youden_threshold(pos: torch.Tensor, neg: torch.Tensor) -> tuple[float, float]:
    """(threshold, TPR - FPR) maximizing Youden's J; a prompt is flagged when its score exceeds the
    threshold."""
    cand = torch.cat([pos, neg]).double().unique()
    best = (float("inf"), -1.0)
    for i in range(len(cand)):
        t = float(cand[i - 1] + cand[i]) / 2 if i else float(cand[0]) - 1e-6
        j = float((pos.double() > t).double().mean() - (neg.double() > t).double().mean())
        if j > best[1]:
            best = (t, j)
    return best


def monitor_run(
    model: Model,
    tok: Tokenizer,
    data: dict,
    direction: Direction,
    fmt: PromptFormat,
    prompts: list[str] | None = None,
    suffix: str | None = None,
    batch_size: int = 32,
) -> dict:
    """Calibrate on the run's training prompts, sweep layers x reads on its evaluation prompts, score
    ``prompts`` at the direction's layer and position, and check GCG-suffixed harmful prompts when a suffix
    is given. Every number says on how many prompts it rests."""

    def scores(split, suffixed=False):
        ins = [x["instruction"] for x in data[split]]
        return projection_scores(
            model,
            tok,
            ins,
            direction.vector,
            direction.pos,
            fmt,
            [suffix] * len(ins) if suffixed else None,
            batch_size,
        )

    layer = direction.layer
    tr_h, tr_l = scores("harmful_train"), scores("harmless_train")
    ev_h, ev_l = scores("eval_harmful"), scores("eval_harmless")
    thresholds = {r: youden_threshold(tr_h[r][:, layer], tr_l[r][:, layer]) for r in READS}
    n_layers = ev_h["last"].shape[1]
    sweep = {
        r: {
            "auroc": [round(auroc(ev_h[r][:, l], ev_l[r][:, l]), 4) for l in range(n_layers)],
            "tpr_at_1pct_fpr": [round(tpr_at_fpr(ev_h[r][:, l], ev_l[r][:, l]), 4) for l in range(n_layers)],
        }
        for r in READS
    }
    t = thresholds["direction"][0]
    out: dict[str, Any] = {
        "layer": layer,
        "position": direction.pos,
        "read": "direction",
        "threshold": round(t, 6),
        "threshold_rule": "Youden's J (max TPR - FPR) on the run's harmful vs harmless training prompts",
        "n_calibration": {"harmful": len(data["harmful_train"]), "harmless": len(data["harmless_train"])},
        "evaluation": {
            r: {
                "auroc": sweep[r]["auroc"][layer],
                "tpr_at_1pct_fpr": sweep[r]["tpr_at_1pct_fpr"][layer],
                "threshold": round(thresholds[r][0], 6),
                "flagged_harmful": round(float((ev_h[r][:, layer] > thresholds[r][0]).double().mean()), 4),
                "flagged_harmless": round(float((ev_l[r][:, layer] > thresholds[r][0]).double().mean()), 4),
            }
            for r in READS
        },
        "n_evaluation": {"harmful": len(data["eval_harmful"]), "harmless": len(data["eval_harmless"])},
        "sweep": sweep,
        "items": [],
    }
    if prompts:
        s = projection_scores(model, tok, prompts, direction.vector, direction.pos, fmt, None, batch_size)
        out["items"] = [
            {"prompt": p, "score": round(float(v), 6), "flagged": bool(v > t)}
            for p, v in zip(prompts, s["direction"][:, layer])
        ]
    if suffix:
        sx = scores("eval_harmful", suffixed=True)
        out["suffix"] = {
            "n": len(data["eval_harmful"]),
            "flagged": {
                r: {
                    "plain": out["evaluation"][r]["flagged_harmful"],
                    "with_gcg_suffix": round(float((sx[r][:, layer] > thresholds[r][0]).double().mean()), 4),
                }
                for r in READS
            },
        }
    return out


def monitor_folder(
    run: RunFolder,
    rt: Runtime,
    direction: Direction,
    prompts: list[str] | None = None,
    out: Path | None = None,
) -> dict:
    """The monitor of a run (:func:`monitor_run` on its prompts, with its GCG suffix when ``suffix.json``
    exists). Writes ``monitor.json`` (without the per-prompt items) into the run folder and the whole
    result to ``out`` when given; returns the whole result."""
    data = json.loads(run.prompts.read_text())
    suffix = json.loads(run.suffix.read_text())["suffix"] if run.suffix.is_file() else None
    res = monitor_run(
        rt.model,
        rt.tokenizer,
        data,
        direction,
        rt.fmt,
        prompts,
        suffix,
        rt.batch.prompt_rows,
    )
    if out is not None:
        write_json(out, res)
    write_json(run.monitor, {k: v for k, v in res.items() if k != "items"})
    return res
