"""refdir: find, test and use the refusal direction of chat language models.

Arditi et al., "Refusal in Language Models Is Mediated by a Single Direction" (NeurIPS 2024).

The public names below are imported on first use (PEP 562): ``refdir --help`` and ``refdir models``
answer without importing torch or transformers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "ModelAdapter": "adapter", "get_adapter": "adapter", "mean_activations": "activations",
    "Prompt": "data", "load_prompts": "data", "Direction": "directions", "candidate_directions": "directions",
    "load_direction": "directions", "RefdirError": "errors", "activation_addition": "interventions",
    "directional_ablation": "interventions", "orthogonalize_weights": "interventions", "load_model": "models",
    "generate": "refusal", "is_refusal": "refusal", "refusal_metric": "refusal", "SelectionConfig": "config",
    "select_direction": "selection", "PromptFormat": "templates", "tokenize_prompts": "templates",
    "Runtime": "runtime", "RunConfig": "config", "export_streaming": "export",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'refdir' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_PUBLIC))
