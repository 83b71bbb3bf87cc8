"""Interruption, determinism and untrusted files."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from refdir.core.errors import RefdirError
from refdir.method.directions import load_direction

SRC = Path(__file__).resolve().parents[1] / "src"
ARGS = [
    "--preset",
    "quick",
    "--filter",
    "none",
    "--kl-threshold",
    "100",
    "--induce-threshold=-1e9",
    "--min-refusal-rate",
    "0",
    "--n-train",
    "24",
    "--n-val",
    "8",
    "--n-eval",
    "12",
    "--max-new-tokens",
    "6",
    "--judge",
    "none",  # a tiny run never loads the probe judge's 0.5B model
]
ARTIFACTS = ["prompts.json", "candidates.safetensors", "direction.safetensors", "completions.jsonl"]


def _cmd(model, out):
    return [sys.executable, "-m", "refdir.cli", "run", "--model", str(model), "--out", str(out), *ARGS]


def _env():
    return {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def reference_run(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    subprocess.run(_cmd(tiny_folder, out), check=True, capture_output=True, env=_env())
    return out


def test_same_seed_gives_bitwise_identical_candidates_and_direction(reference_run, tiny_folder, tmp_path):
    out = tmp_path / "again"
    subprocess.run(_cmd(tiny_folder, out), check=True, capture_output=True, env=_env())
    for name in ARTIFACTS:
        assert _digest(out / name) == _digest(reference_run / name), name
    a = json.loads((out / "selection.json").read_text())
    b = json.loads((reference_run / "selection.json").read_text())
    assert a["chosen"] == b["chosen"] and a["bypass"] == b["bypass"]


@pytest.mark.parametrize("kill_after", ["prompts", "extract", "select"])
def test_kill_9_and_resume_gives_identical_artifacts(reference_run, tiny_folder, tmp_path, kill_after):
    out = tmp_path / "killed"
    p = subprocess.Popen(
        _cmd(tiny_folder, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env()
    )
    stages = out / "stages.json"
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if stages.exists() and f'"{kill_after}"' in stages.read_text():
            break
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    r = subprocess.run(_cmd(tiny_folder, out), capture_output=True, text=True, env=_env())
    assert r.returncode == 0, r.stderr[-500:]
    assert f"{kill_after}: reused" in r.stderr or "reused" in r.stderr
    for name in ARTIFACTS:
        assert _digest(out / name) == _digest(reference_run / name), name
    assert not [f for f in out.iterdir() if f.name.endswith(".tmp")]


def test_pt_direction_is_read_without_pickle_code(tmp_path):
    v = torch.randn(64)
    torch.save(v, tmp_path / "dir.pt")
    d = load_direction(tmp_path / "dir.pt", expect_d_model=64)
    assert torch.equal(d.vector, v)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"x": Evil()}, tmp_path / "evil.pt", _use_new_zipfile_serialization=True)
    with pytest.raises(RefdirError):
        load_direction(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


def test_source_has_no_pickle_and_safe_defaults():
    text = "\n".join(p.read_text() for p in (SRC / "refdir").rglob("*.py"))
    assert not re.search(r"^\s*import pickle|pickle\.load", text, re.M)
    for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
        assert "weights_only=True" in m.group(1)
    assert "trust_remote_code=True" not in text


def test_select_never_follows_paths_from_run_metadata(tiny_folder, tmp_path, capsys):
    from refdir.cli import main

    out = tmp_path / "r"
    assert main(["extract", "--model", str(tiny_folder), "--out", str(out), *ARGS]) == 0
    cfg = json.loads((out / "config.json").read_text())
    cfg["harmful"] = "/etc/passwd"  # tampered metadata: a path outside the run folder
    (out / "config.json").write_text(json.dumps(cfg))
    assert main(["select", "--out", str(out)]) == 2
    assert "rerun `refdir extract`" in capsys.readouterr().err


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
    max_leaves=8,
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=json_values, stages=json_values, raw=st.binary(max_size=40))
def test_run_folder_metadata_parser_accepts_or_rejects_cleanly(tmp_path_factory, config, stages, raw):
    """Arbitrary config.json / stages.json contents: either accepted or one RefdirError, never a crash."""
    from refdir.run.folder import RunFolder, StageLedger, check_run_folder

    d = tmp_path_factory.mktemp("meta")
    for name, value in (("config.json", config), ("stages.json", stages)):
        (d / name).write_text(json.dumps(value))
    for attempt in range(2):
        try:
            check_run_folder(d, "some-model")
            StageLedger(RunFolder(d)).fresh("prompts", "k", RunFolder(d).prompts)
        except RefdirError:
            pass
        (d / "stages.json").write_bytes(raw)  # then raw bytes, not even JSON
