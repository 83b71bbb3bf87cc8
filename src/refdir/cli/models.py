"""``refdir models``: the offline model aliases and whether their packages are installed (torch-free)."""

from __future__ import annotations

import argparse
from typing import Any

from refdir.core.errors import RefdirError


def add_parser(sub: Any) -> None:
    m = sub.add_parser(
        "models", help="list the offline model aliases and whether their packages are installed"
    )
    m.set_defaults(func=cmd_models)


def cmd_models(a: argparse.Namespace) -> int:
    from refdir.core.models import DEFAULT_MODEL, OFFLINE_MODELS, offline_parts

    for alias, m in OFFLINE_MODELS.items():
        try:
            offline_parts(m)
            state = "installed"
        except RefdirError:
            state = f"not installed: pip install 'refdir[{m.extra}]'"
        print(
            f"{alias:30} {'(default) ' if alias == DEFAULT_MODEL else ''}"
            f"{'chat' if m.is_chat else 'base'}  {state}"
        )
    return 0
