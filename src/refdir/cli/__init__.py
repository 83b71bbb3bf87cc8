"""Command line: ``refdir run | extract | select | evaluate | export | ...`` (``refdir --help``).

One module per command (or per small group of related ones): each has ``add_parser(sub)``, which adds
its subparser and names its ``cmd_*`` function, and computes nothing itself but calls the library.
Every command validates its inputs before heavy work; a :class:`RefdirError` becomes one line on
stderr and exit status 2 (a traceback only with ``--debug``). Nothing here imports torch at module
level: ``refdir --help`` and ``refdir models`` stay fast.
"""

from __future__ import annotations

import argparse
import sys

from refdir.cli import (
    audit,
    capabilities,
    cone,
    evaluate,
    export,
    jailbreaks,
    judge,
    judge_train,
    models,
    monitor,
    overrefusal,
    run,
    search,
    suffix,
)
from refdir.cli.audit import cmd_audit
from refdir.cli.capabilities import cmd_capabilities
from refdir.cli.common import Parser, load_options, positive_int, print_summary
from refdir.cli.cone import cmd_cone
from refdir.cli.evaluate import cmd_evaluate
from refdir.cli.export import cmd_export
from refdir.cli.jailbreaks import cmd_jailbreaks
from refdir.cli.judge import cmd_judge
from refdir.cli.judge_train import cmd_judge_train
from refdir.cli.models import cmd_models
from refdir.cli.monitor import cmd_monitor
from refdir.cli.overrefusal import cmd_overrefusal
from refdir.cli.run import cmd_run, cmd_select
from refdir.cli.search import cmd_search
from refdir.cli.suffix import cmd_analyze_suffix, cmd_compare_base, cmd_suffix
from refdir.core.errors import RefdirError

__all__ = [
    "build_parser",
    "cmd_analyze_suffix",
    "cmd_audit",
    "cmd_capabilities",
    "cmd_compare_base",
    "cmd_cone",
    "cmd_evaluate",
    "cmd_export",
    "cmd_jailbreaks",
    "cmd_judge",
    "cmd_judge_train",
    "cmd_models",
    "cmd_monitor",
    "cmd_overrefusal",
    "cmd_run",
    "cmd_search",
    "cmd_select",
    "cmd_suffix",
    "load_options",
    "main",
    "positive_int",
    "print_summary",
]

# in the order ``refdir --help`` lists them
COMMANDS = (
    run,
    search,
    evaluate,
    export,
    suffix,
    judge,
    judge_train,
    cone,
    overrefusal,
    audit,
    monitor,
    capabilities,
    jailbreaks,
    models,
)


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="refdir", description="Find, test and use the refusal direction of chat LMs.")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=Parser)
    for command in COMMANDS:
        command.add_parser(sub)
    return ap


def _out_of_memory(a: argparse.Namespace, e: BaseException) -> int:
    where = "GPU" if type(e).__name__ == "OutOfMemoryError" else "host"
    print(
        f"refdir: error: out of {where} memory during `refdir {a.cmd}`; completed stages are kept: lower "
        "--batch-size / --gen-batch-size, or use --device-map auto (several devices, offload) "
        "or --load-in-4bit",
        file=sys.stderr,
    )
    return 2


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return a.func(a)
    except RefdirError as e:
        if a.debug:
            raise
        print(f"refdir: error: {e}", file=sys.stderr)
        return 2
    except MemoryError as e:  # torch.OutOfMemoryError (GPU) subclasses RuntimeError: caught below
        return _out_of_memory(a, e)
    except RuntimeError as e:
        if type(e).__name__ != "OutOfMemoryError" or a.debug:
            raise
        return _out_of_memory(a, e)
    except KeyboardInterrupt:
        print("refdir: interrupted; completed stages are kept and a rerun resumes from them", file=sys.stderr)
        return 130
