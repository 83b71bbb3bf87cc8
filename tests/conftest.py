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
