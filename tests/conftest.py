import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import FAMILIES, tiny_model  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


@pytest.fixture
def tiny(family):
    return tiny_model(family)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A tiny Qwen2 checkpoint saved to disk, for CLI tests."""
    model, tok = tiny_model("qwen2")
    d = tmp_path_factory.mktemp("tinyq")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


REAL_MODEL = "qwen2.5-coder-0.5b-instruct"
# Measured: on this model +r at coefficient 1 raises the harmless refusal log-odds from about -4.4 to -2.5 at
# best, below its calibrated refusal threshold (about -0.6), so with default filters selection stops ("every
# candidate filtered by induce"; see README). Disable the induce filter to test the rest. test_api.py's
# find_direction uses the same settings (preset="quick", induce_threshold=-1e9): keep them in step.
QUICK_RUN_FLAGS = ["--preset", "quick", "--induce-threshold=-1e9"]


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    """``refdir run --preset quick`` on the real 0.5B, once per session: test_real_model.py and test_api.py
    share this one run (about 3 minutes on a 2-core CPU). Only slow tests, skipped without the model
    packages, ask for it."""
    from refdir.cli import main

    out = tmp_path_factory.mktemp("real") / "run"
    assert main(["run", "--model", REAL_MODEL, *QUICK_RUN_FLAGS, "--out", str(out)]) == 0
    return out
