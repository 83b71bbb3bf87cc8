"""refdir: find, test and use the refusal direction of chat language models.

Arditi et al., "Refusal in Language Models Is Mediated by a Single Direction" (NeurIPS 2024).

Subpackages, in the order data flows through them:

* ``refdir.core`` — loading, devices, the architecture adapter, prompt formats, batched forwards, ``Runtime``.
* ``refdir.method`` — the paper's method: data, prompt screen, activations, candidates, selection, edits.
* ``refdir.evaluation`` — conditions and refusal rates, judges, jailbreak table, capability benchmarks.
* ``refdir.analyses`` — beyond one direction: refusal cone, monitor, GCG suffixes and their analysis.
* ``refdir.outputs`` — what leaves a run: streamed export, HTML report, audit page.
* ``refdir.run`` — settings schema, run folder, the stage table that runs it all.
* ``refdir.cli`` — argument parsing; one module per command, computing nothing itself.

The public names below are imported on first use (PEP 562): ``refdir --help`` and ``refdir models``
answer without importing torch or transformers. Modules that lived at the top level before the
subpackages (``refdir.selection``, ...) still import, with a ``DeprecationWarning`` naming the new path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType

__version__ = "0.1.0"

_PUBLIC = {
    "ModelAdapter": "core.adapter",
    "get_adapter": "core.adapter",
    "mean_activations": "method.activations",
    "Prompt": "method.data",
    "load_prompts": "method.data",
    "Direction": "method.directions",
    "candidate_directions": "method.directions",
    "load_direction": "method.directions",
    "find_direction": "method.find",
    "Edit": "method.edits",
    "DirectionalAblation": "method.edits",
    "SubspaceAblation": "method.edits",
    "ActivationAddition": "method.edits",
    "check_equivalence": "method.edits",
    "WeightedAblation": "method.weighted",
    "run_search": "run.search",
    "SearchSettings": "run.search",
    "trial_edit": "run.search",
    "RefdirError": "core.errors",
    "activation_addition": "method.interventions",
    "directional_ablation": "method.interventions",
    "orthogonalize_weights": "method.interventions",
    "load_model": "core.models",
    "generate": "method.refusal",
    "is_refusal": "method.refusal",
    "refusal_metric": "method.refusal",
    "SelectionConfig": "run.settings",
    "select_direction": "method.selection",
    "PromptFormat": "core.prompt_format",
    "tokenize_prompts": "core.templates",
    "Runtime": "core.runtime",
    "RunConfig": "run.settings",
    "export_streaming": "outputs.export",
}
__all__ = sorted(_PUBLIC)

# where each module of the flat layout (before the subpackages) lives now
MOVED = {
    "errors": "core.errors",
    "io": "core.io",
    "models": "core.models",
    "adapter": "core.adapter",
    "templates": "core.templates",
    "forward": "core.forward",
    "runtime": "core.runtime",
    "data": "method.data",
    "screen": "method.screen",
    "activations": "method.activations",
    "directions": "method.directions",
    "selection": "method.selection",
    "cosmic": "method.cosmic",
    "interventions": "method.interventions",
    "refusal": "method.refusal",
    "judges": "evaluation.judges",
    "jailbreaks": "evaluation.jailbreaks",
    "capabilities": "evaluation.capabilities",
    "cone": "analyses.cone",
    "monitor": "analyses.monitor",
    "suffix": "analyses.suffix",
    "analysis": "analyses.suffix_analysis",
    "export": "outputs.export",
    "report": "outputs.report",
    "audit": "outputs.audit",
    "config": "run.settings",
    "pipeline": "run.pipeline",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import refdir.selection`` gives the module at its new path (the same object, so patching either
    name patches both) and warns once with that path."""

    def find_spec(self, fullname: str, path=None, target=None):
        old = fullname.removeprefix(__name__ + ".")
        if fullname.startswith(__name__ + ".") and old in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = f"{__name__}.{MOVED[spec.name.removeprefix(__name__ + '.')]}"
        warnings.warn(f"{spec.name} moved to {new}", DeprecationWarning, stacklevel=3)
        module = importlib.import_module(new)
        self._spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self._spec  # importlib set the old name's spec: the module keeps its own


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.append(_MovedModules())


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'refdir' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_PUBLIC))
