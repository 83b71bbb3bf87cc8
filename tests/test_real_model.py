"""End-to-end on the real Qwen2.5-Coder-0.5B-Instruct (offline PyPI data packages).

Skipped when the model packages are not installed; CI installs them (``.[models-small]``).
Asserts on metrics only, never on the content of completions.
"""

import json

import pytest

from refdir.errors import RefdirError
from refdir.models import OFFLINE_MODELS, offline_parts

MODEL = "qwen2.5-coder-0.5b-instruct"

try:
    offline_parts(OFFLINE_MODELS[MODEL])
    HAVE = True
except RefdirError:
    HAVE = False

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not HAVE, reason=f"{MODEL} packages not installed")]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from refdir.cli import main
    out = tmp_path_factory.mktemp("real") / "run"
    # Measured: on this model +r at coefficient 1 raises the harmless refusal log-odds from about -4.4 to
    # -2.5 at best, below its calibrated refusal threshold (about -0.6), so with default filters selection
    # stops ("every candidate filtered by induce"; see README). Disable the induce filter to test the rest.
    assert main(["run", "--model", MODEL, "--preset", "quick", "--out", str(out), "--induce-threshold=-1e9"]) == 0
    return out


def test_quick_run_refusal_falls_under_ablation(quick_run):
    ev = json.loads((quick_run / "eval.json").read_text())
    harmful = ev["refusal"]["harmful"]
    assert harmful["baseline"]["refusal_rate"] >= 0.25
    assert harmful["ablation"]["refusal_rate"] <= harmful["baseline"]["refusal_rate"] - 0.2
    assert ev["refusal"]["harmless"]["actadd+"]["refusal_rate"] >= ev["refusal"]["harmless"]["baseline"]["refusal_rate"]


def test_orthogonalization_equals_ablation_on_the_real_model(quick_run):
    ev = json.loads((quick_run / "eval.json").read_text())
    assert ev["ortho_check"]["max_abs_logit_diff_vs_ablation"] <= 1e-3


def test_selected_direction_passes_the_filters(quick_run):
    d = json.loads((quick_run / "direction.json").read_text())
    assert d["scores"]["kl"] < 0.1
    assert d["layer"] < int(0.8 * 24)
