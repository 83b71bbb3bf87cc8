"""``refdir search``: the refusal/KL trade-off of weight edits, searched on a run folder
(:func:`refdir.run.search.run_search`); this module parses its flags and prints the confirmed front."""

from __future__ import annotations

import argparse
from typing import Any

from refdir.cli.common import add_model_args, load_for_run, positive_int
from refdir.core.errors import RefdirError
from refdir.run.folder import RunFolder
from refdir.run.settings import add_setting


def add_parser(sub: Any) -> None:
    s = sub.add_parser(
        "search",
        help="multi-objective search over weight edits (refusal, first-token KL); writes RUN/front.json",
    )
    add_model_args(s, from_run=True)
    s.add_argument("--run", required=True, help="run folder (its prompts, candidates and direction)")
    s.add_argument("--trials", type=positive_int, default=64, help="trials in all, trial 0 the paper's")
    s.add_argument("--batch-trials", type=positive_int, default=8, help="trials scored per forward pass")
    s.add_argument("--confirm", type=int, default=6, help="proxy-front trials confirmed by generation")
    s.add_argument(
        "--confirm-max-refusal",
        type=float,
        default=None,
        help="confirm only proxy-front trials whose proxy refusal is at most this (e.g. near the paper's)",
    )
    s.add_argument("--n-proxy", type=positive_int, default=None, help="validation prompts per set (all)")
    s.add_argument("--n-eval", type=positive_int, default=None, help="evaluation prompts per set (all)")
    add_setting(s, "max_new_tokens", default=64, help="greedy tokens per confirming completion")
    s.add_argument("--sampler", choices=("tpe", "nsga2"), default="tpe")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--norms",
        default="none,output",
        help="channel norms a trial may keep: comma-separated of none, output, input (default none,output)",
    )
    s.set_defaults(func=cmd_search)


def cmd_search(a: argparse.Namespace) -> int:
    from refdir.outputs.report import write_report
    from refdir.run.search import SearchSettings, run_search

    norms = tuple(x.strip() for x in a.norms.split(",") if x.strip())
    bad = [n for n in norms if n not in ("none", "output", "input")]
    if bad or not norms:
        raise RefdirError(f"--norms: unknown norm {bad[0] if bad else '(empty)'}; use none, output, input")
    run = RunFolder(a.run)
    _, rt, _ = load_for_run(a, run)
    settings = SearchSettings(
        trials=a.trials,
        batch_trials=a.batch_trials,
        confirm=a.confirm,
        confirm_max_refusal=a.confirm_max_refusal,
        n_proxy=a.n_proxy,
        n_eval=a.n_eval,
        max_new_tokens=a.max_new_tokens,
        sampler=a.sampler,
        seed=a.seed,
        norms=norms,
    )
    front = run_search(rt, run.path, settings)
    write_report(run.path)
    trials = {t["number"]: t for t in front["trials"]}
    print(f"{'trial':>5} {'refusal':>8} {'KL':>8}  (confirmed front; trial 0 = the paper's direction)")
    for n in front["confirmed_front"]:
        c = trials[n]["confirmed"]
        print(f"{n:5d} {c['refusal']:8.3f} {c['kl']:8.4f}")
    t = front["timing"]
    print(
        f"search: {len(trials)} trials, {t['proxy_trials_per_min']} proxy trials/min, "
        f"{t['confirmed_trials_per_min']} confirmed/min -> {run.front}; export one with "
        f"refdir export --run {run.path} --trial N --out DIR"
    )
    return 0
