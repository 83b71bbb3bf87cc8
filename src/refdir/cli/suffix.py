"""``refdir suffix | analyze-suffix | compare-base``: adversarial suffixes (GCG) and what they do to the
direction (paper §5), and the chat model's direction in its base model (App. J)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from refdir.cli.common import (
    add_load_args,
    add_model_args,
    check_writable,
    load_for_run,
    load_options,
    positive_int,
)
from refdir.core.errors import RefdirError
from refdir.run.folder import RunFolder
from refdir.run.settings import add_setting


def add_parser(sub: Any) -> None:
    g = sub.add_parser("suffix", help="optimize an adversarial suffix (GCG) and screen it for universality")
    add_model_args(g, from_run=True)
    g.add_argument("--run", required=True, help="run folder (its prompts and direction are used)")
    g.add_argument(
        "--n-prompts", type=positive_int, default=4, help="harmful training prompts to optimize on"
    )
    g.add_argument("--n-tokens", type=positive_int, default=20)
    g.add_argument("--steps", type=positive_int, default=100)
    g.add_argument("--time-budget", type=float, default=None, help="stop optimizing after this many seconds")
    g.add_argument("--topk", type=positive_int, default=64)
    g.add_argument("--search-batch", type=positive_int, default=32, help="candidate swaps evaluated per step")
    add_setting(g, "n_eval", default=32, help="held-out harmful prompts for the screen")
    add_setting(g, "max_new_tokens", default=32, help="greedy tokens per screened completion")
    add_setting(g, "seed", default=0, help="seed of the suffix's initialization and the random suffix")
    g.set_defaults(func=cmd_suffix)

    s = sub.add_parser(
        "analyze-suffix", help="cosine per layer, refusal heads, attention hijacking (paper §5)"
    )
    add_model_args(s, from_run=True)
    s.add_argument("--run", required=True)
    s.add_argument(
        "--suffix-file", default=None, help="a text file with the suffix (default: RUN/suffix.json)"
    )
    s.add_argument("--n", type=positive_int, default=32, help="harmful and harmless prompts to analyze")
    s.add_argument("--top-k", type=positive_int, default=8)
    add_setting(s, "seed", default=0, help="seed of the random suffix compared against")
    s.set_defaults(func=cmd_analyze_suffix)

    c = sub.add_parser("compare-base", help="App. J: the chat model's direction in a base model")
    c.add_argument("--chat", required=True)
    c.add_argument("--base", required=True)
    c.add_argument("--direction", required=True)
    c.add_argument("--n", type=positive_int, default=32)
    c.add_argument("--out", required=True)
    add_load_args(c)
    c.set_defaults(func=cmd_compare_base)


def cmd_suffix(a: argparse.Namespace) -> int:
    from refdir.analyses.suffix import affirmative_target, gcg, universality_screen
    from refdir.core.io import write_json

    run = RunFolder(a.run)
    data, rt, _ = load_for_run(a, run)
    model, tok, fmt = rt.model, rt.tokenizer, rt.fmt
    train = [x["instruction"] for x in data["harmful_train"][: a.n_prompts]]
    targets = [affirmative_target(x) for x in train]
    res = gcg(
        model, tok, train, targets, a.n_tokens, a.steps, a.topk, a.search_batch, a.seed, a.time_budget, fmt
    )
    held = [x["instruction"] for x in data["eval_harmful"][: a.n_eval]]
    rates = universality_screen(model, tok, held, res.suffix, a.n_tokens, a.seed, fmt, a.max_new_tokens)
    out = {
        "suffix": res.suffix,
        "token_ids": res.token_ids,
        "steps": res.steps,
        "seconds": round(res.seconds, 1),
        "losses": res.losses,
        "n_train_prompts": len(train),
        "n_eval": len(held),
        "refusal_rate": rates,
        "seed": a.seed,
        "n_tokens": a.n_tokens,
    }
    write_json(run.suffix, out)
    print(
        f"GCG: {res.steps} steps in {res.seconds:.0f} s, "
        f"loss {res.losses[0] if res.losses else float('nan'):.3f}"
        f" -> {res.losses[-1] if res.losses else float('nan'):.3f}; "
        f"held-out refusal: none {rates['none']:.2f}, "
        f"random suffix {rates['random']:.2f}, adversarial suffix {rates['adversarial']:.2f}"
    )
    return 0


def _suffix_text(a: argparse.Namespace, run: RunFolder) -> str:
    """The suffix to analyze: ``--suffix-file``, else the run's ``suffix.json`` (checked before loading)."""
    if a.suffix_file:
        try:
            suffix = Path(a.suffix_file).read_text().strip()
        except OSError as e:
            raise RefdirError(f"cannot read --suffix-file {a.suffix_file}: {e.strerror}") from None
        if not suffix:
            raise RefdirError(f"--suffix-file {a.suffix_file} is empty")
        return suffix
    if run.suffix.is_file():
        return json.loads(run.suffix.read_text())["suffix"]
    raise RefdirError(f"no suffix: pass --suffix-file or run `refdir suffix --run {run.path}` first")


def cmd_analyze_suffix(a: argparse.Namespace) -> int:
    from refdir.analyses.suffix_analysis import suffix_analysis
    from refdir.core.io import write_json
    from refdir.outputs.report import write_report

    run = RunFolder(a.run)
    suffix = _suffix_text(a, run)
    data, rt, direction = load_for_run(a, run)
    model, tok, fmt = rt.model, rt.tokenizer, rt.fmt
    harmful = [x["instruction"] for x in data["harmful_val"] + data["harmful_train"]][: a.n]
    harmless = [x["instruction"] for x in data["harmless_val"] + data["harmless_train"]][: a.n]
    n_tok = len(tok(suffix, add_special_tokens=False)["input_ids"])
    t = time.time()
    res = suffix_analysis(
        model, tok, harmful, harmless, direction.vector, suffix, n_tok, a.top_k, a.seed, fmt
    )
    res["seconds"] = round(time.time() - t, 1)
    write_json(run.suffix_analysis, res)
    write_report(run.path)
    print(f"suffix analysis written to {run.suffix_analysis} and {run.report}")
    return 0


def cmd_compare_base(a: argparse.Namespace) -> int:
    from refdir.analyses.base_vs_chat import compare_base
    from refdir.core.io import write_json
    from refdir.core.models import load_model
    from refdir.method.data import load_builtin
    from refdir.method.directions import load_direction

    direction = load_direction(a.direction)
    out = Path(a.out)
    check_writable(out)
    harmful = [p.instruction for p in load_builtin("harmful")[: a.n]]
    harmless = [p.instruction for p in load_builtin("harmless")[: a.n]]
    chat, ctok = load_model(a.chat, **load_options(a))
    base, btok = load_model(a.base, **load_options(a))
    res = compare_base(chat, ctok, base, btok, harmful, harmless, direction.vector)
    write_json(out, {"chat": a.chat, "base": a.base, "direction": a.direction, "n": a.n, "cosine": res})
    print(f"compare-base written to {out}")
    return 0
