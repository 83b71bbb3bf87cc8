"""End-to-end on the real Qwen2.5-Coder-0.5B-Instruct (offline PyPI data packages).

Skipped when the model packages are not installed; CI installs them (``.[models-small]``).
Asserts on metrics only, never on the content of completions.
"""

import json

import pytest

from refdir.core.errors import RefdirError
from refdir.core.models import OFFLINE_MODELS, offline_parts
from refdir.run.folder import RunFolder

MODEL = "qwen2.5-coder-0.5b-instruct"

try:
    offline_parts(OFFLINE_MODELS[MODEL])
    HAVE = True
except RefdirError:
    HAVE = False

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not HAVE, reason=f"{MODEL} packages not installed")]


def test_quick_run_refusal_falls_under_ablation(quick_run):
    ev = json.loads(RunFolder(quick_run).eval.read_text())
    d = json.loads(RunFolder(quick_run).direction_meta.read_text())
    harmful, harmless = ev["refusal"]["harmful"], ev["refusal"]["harmless"]
    # measured with these settings: baseline 0.31, ablation 0.25, -r 0.12 on 16 unfiltered prompts;
    # +r 0.12 -> 0.50
    assert harmful["baseline"]["refusal_rate"] >= 0.2
    assert harmful["ablation"]["refusal_rate"] < harmful["baseline"]["refusal_rate"]
    assert harmful["actadd-"]["refusal_rate"] < harmful["baseline"]["refusal_rate"]
    assert harmless["actadd+"]["refusal_rate"] > harmless["baseline"]["refusal_rate"]
    # and on the refusal metric itself (log-odds of the refusal tokens): ablation removes > 1 nat
    assert d["bypass"] < d["scores"]["harmful_refusal_metric"] - 1.0


def test_orthogonalization_equals_ablation_on_the_real_model(quick_run):
    ev = json.loads(RunFolder(quick_run).eval.read_text())
    assert ev["ortho_check"]["max_abs_logit_diff_vs_ablation"] <= 1e-3


def test_selected_direction_passes_the_filters(quick_run):
    d = json.loads(RunFolder(quick_run).direction_meta.read_text())
    assert d["scores"]["kl"] < 0.1
    assert d["layer"] < int(0.8 * 24)


def test_the_probe_judge_is_the_runs_default_second_judge(quick_run):
    """The quick run keeps the default judge ("auto"): the probe where it can run, else none."""
    from refdir.evaluation.probe_judge import probe_unavailable

    judge = json.loads(RunFolder(quick_run).eval.read_text())["judge"]
    if probe_unavailable() is not None:
        assert judge is None
        return
    assert judge["kind"] == "probe" and judge["judge"] == "probe" and judge["requested"] == "auto"
    assert judge["conditions"]
    for block in judge["conditions"].values():
        assert 0 <= block["agreement"] <= 1
