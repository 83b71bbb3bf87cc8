"""``refdir evaluate``: the refusal rate of one prompt set under one intervention (or none).

The prompts, the direction and the output location are checked before the model loads; the direction
is read once and then checked against the loaded model.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from refdir.cli.common import (
    add_model_args,
    check_direction_fits,
    check_writable,
    load_options,
    positive_int,
    prompt_format,
)
from refdir.core.errors import RefdirError
from refdir.run.settings import add_setting

if TYPE_CHECKING:
    import torch

    from refdir.core.prompt_format import PromptFormat
    from refdir.core.types import Model, Tokenizer
    from refdir.evaluation.conditions import Judged
    from refdir.method.directions import Direction


def add_parser(sub: Any) -> None:
    e = sub.add_parser("evaluate", help="refusal rate of a prompt set under one intervention")
    add_model_args(e)
    e.add_argument("--direction", required=True, help="run folder or direction .safetensors/.pt")
    e.add_argument(
        "--prompts", required=True, help="builtin:harmful, a .json/.jsonl/.csv/.txt file, or hub dataset"
    )
    e.add_argument("--intervention", required=True, choices=["none", "ablate", "actadd", "ortho"])
    e.add_argument(
        "--coeff", type=float, default=1.0, help="activation-addition coefficient (negative subtracts)"
    )
    e.add_argument("--layer", type=int, default=None, help="layer for actadd (default: the direction's)")
    add_setting(e, "prompt_field")
    e.add_argument("--n", type=positive_int, default=None, help="use the first N prompts")
    add_setting(e, "max_new_tokens", default=64, help="greedy tokens per completion")
    add_setting(e, "batch_size", default=128, help="prompts per generation batch")
    e.add_argument(
        "--rank",
        type=positive_int,
        default=1,
        help="ablate / orthogonalize the first RANK vectors of the run's refusal cone (refdir cone)",
    )
    e.add_argument(
        "--trial",
        type=int,
        default=None,
        help="apply trial N of `refdir search` on the run folder --direction instead of the direction "
        "(--intervention ablate: its hook form, ortho: its weight form)",
    )
    e.add_argument("--out", required=True, help="output .json")
    e.set_defaults(func=cmd_evaluate)


def cmd_evaluate(a: argparse.Namespace) -> int:
    from refdir.core.adapter import get_adapter
    from refdir.core.forward import check_prompts_fit
    from refdir.core.io import write_json
    from refdir.core.models import load_model
    from refdir.evaluation.conditions import refusal_rate
    from refdir.method.data import load_prompts
    from refdir.method.directions import load_direction

    prompts = load_prompts(a.prompts, a.field)[: a.n or None]
    direction = load_direction(a.direction)  # read once, before the model loads
    if a.trial is not None and (a.intervention not in ("ablate", "ortho") or a.rank > 1):
        raise RefdirError("--trial takes --intervention ablate (hooks) or ortho (weights), without --rank")
    edit = None
    if a.trial is not None:
        from refdir.run.search import trial_edit

        edit = trial_edit(a.direction, a.trial)
    out = Path(a.out)
    check_writable(out)
    model, tok = load_model(a.model, **load_options(a))
    ad = get_adapter(model)
    check_direction_fits(direction, a.direction, ad.d_model, getattr(model, "refdir_spec", None))
    if a.layer is not None:
        if not 0 <= a.layer < ad.n_layers:
            raise RefdirError(f"--layer {a.layer} is out of range: the model has layers 0..{ad.n_layers - 1}")
        direction.layer = a.layer
    if a.intervention == "actadd" and direction.layer < 0:
        raise RefdirError("this direction file records no layer; pass --layer for actadd")
    fmt = prompt_format(a)
    ins, cats = [p.instruction for p in prompts], [p.category for p in prompts]
    check_prompts_fit(model, tok, ins, fmt, a.max_new_tokens)
    subspace = _subspace(a, ad.d_model)
    if edit is not None:
        items = _generate_edit(a, model, tok, edit, ins, cats, fmt)
    else:
        items = _generate(a, model, tok, direction, subspace, ins, cats, fmt)
    result = {
        "refusal_rate": refusal_rate(items),
        "n": len(items),
        "intervention": a.intervention,
        "coeff": a.coeff,
        "rank": a.rank,
        "trial": a.trial,
        "items": [{"prompt": j.prompt, "refused": j.refused, "completion": j.completion} for j in items],
    }
    write_json(out, result)
    print(f"refusal rate {result['refusal_rate']:.3f} on {len(items)} prompts ({a.intervention}) -> {out}")
    return 0


def _subspace(a: argparse.Namespace, d_model: int) -> torch.Tensor | None:
    """The run's cone basis ``[rank, d]`` for ``--rank`` > 1, else None (the direction alone)."""
    if a.rank <= 1:
        return None
    if a.intervention not in ("ablate", "ortho"):
        raise RefdirError(
            "--rank applies to --intervention ablate or ortho (a subspace has no single vector to add)"
        )
    from refdir.method.directions import load_subspace

    return load_subspace(a.direction, a.rank, d_model)


def _generate(
    a: argparse.Namespace,
    model: Model,
    tok: Tokenizer,
    direction: Direction,
    subspace: torch.Tensor | None,
    ins: list[str],
    cats: list[str | None],
    fmt: PromptFormat,
) -> list[Judged]:
    """Greedy completions under the intervention, judged; ``ortho`` edits the weights in place (this
    process owns the model)."""
    from refdir.evaluation.conditions import condition, generate_judged
    from refdir.method.interventions import orthogonalize_weights, subspace_ablation

    if a.intervention == "ortho":
        for v in subspace if subspace is not None else [direction.vector]:
            orthogonalize_weights(model, v)
        return generate_judged(model, tok, ins, cats, fmt, a.max_new_tokens, a.batch_size, "ortho")
    ctx = (
        subspace_ablation(model, subspace)
        if subspace is not None
        else condition(model, a.intervention, direction, a.coeff)
    )
    with ctx:
        return generate_judged(model, tok, ins, cats, fmt, a.max_new_tokens, a.batch_size, a.intervention)


def _generate_edit(
    a: argparse.Namespace,
    model: Model,
    tok: Tokenizer,
    edit: Any,
    ins: list[str],
    cats: list,
    fmt: PromptFormat,
) -> list[Judged]:
    """Greedy completions under a search trial's edit: hooks (``ablate``) or weights (``ortho``)."""
    from refdir.evaluation.conditions import generate_judged

    name = f"trial {a.trial} ({a.intervention})"
    if a.intervention == "ortho":
        edit.apply_to_weights(model)
        return generate_judged(model, tok, ins, cats, fmt, a.max_new_tokens, a.batch_size, name)
    with edit.hooks(model):
        return generate_judged(model, tok, ins, cats, fmt, a.max_new_tokens, a.batch_size, name)
