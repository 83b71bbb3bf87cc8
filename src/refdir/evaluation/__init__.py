"""Evaluation of a direction or edit: conditions and refusal rates, KL and CE (``conditions``), judges,
the jailbreak table and capability benchmarks.

``refdir.evaluation`` was a module before the subpackages; its names still resolve here (from
``refdir.evaluation.conditions``) with a ``DeprecationWarning``.
"""

from __future__ import annotations

import importlib
import warnings


def __getattr__(name: str):
    module = importlib.import_module(f"{__name__}.conditions")
    if name.startswith("__") or not hasattr(module, name):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"refdir.evaluation.{name} moved to refdir.evaluation.conditions.{name}",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(module, name)
