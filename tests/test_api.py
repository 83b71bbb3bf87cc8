"""The notebook API: ``find_direction`` makes ``refdir run``'s choice in memory, ``Direction``'s hooks are the
evaluation's, and the README's Python example runs.

Tiny random models check the equality with the run folder on every commit; the real 0.5B (slow, skipped
without its packages) checks it on the run ``tests/test_real_model.py`` also reads (one shared session
fixture, ``quick_run`` in conftest.py).
"""

import json
import re
from pathlib import Path

import pytest
import torch
from tiny import tiny_model

from refdir.core.errors import RefdirError
from refdir.core.models import OFFLINE_MODELS, offline_parts
from refdir.method.data import load_builtin
from refdir.method.directions import Direction
from refdir.method.find import find_direction
from refdir.method.selection import SelectionConfig
from refdir.run.folder import RunFolder
from refdir.run.settings import RunConfig

REAL = "qwen2.5-coder-0.5b-instruct"
README = Path(__file__).resolve().parents[1] / "README.md"
# the tiny model does not refuse: no filter, no minimum refusal rate, no KL / induce filter
TINY = dict(n_train=10, n_val=4, n_eval=4, filter="none", min_refusal_rate=0.0, gen_batch_size=6)
TINY_SELECTION = dict(kl_threshold=100.0, induce_threshold=-1e9)

try:
    offline_parts(OFFLINE_MODELS[REAL])
    HAVE_REAL = True
except RefdirError:
    HAVE_REAL = False


def real(test):
    """Slow, and skipped without the 0.5B's packages."""
    return pytest.mark.slow(pytest.mark.skipif(not HAVE_REAL, reason=f"{REAL} packages not installed")(test))


def _same(found: Direction, saved: Direction) -> None:
    assert (found.layer, found.pos, found.model) == (saved.layer, saved.pos, saved.model)
    assert (found.vector - saved.vector).abs().max() < 1e-5
    assert found.scores.keys() == saved.scores.keys()
    for k, v in saved.scores.items():
        assert found.scores[k] == pytest.approx(v, abs=1e-5), k
    assert found.extra == saved.extra


def test_find_direction_is_the_run_folders_direction_on_a_tiny_model(tmp_path):
    from refdir.run.pipeline import run_pipeline

    model, tok = tiny_model("qwen2")
    # 24 prompts per side: the tiny model never refuses, so the screen reads every prompt it is given
    sides = {side: load_builtin(side)[:24] for side in ("harmful", "harmless")}
    files = {side: tmp_path / f"{side}.json" for side in sides}
    for side, prompts in sides.items():
        files[side].write_text(json.dumps([p.to_json() for p in prompts]))
    cfg = RunConfig(
        model="tiny",
        judge=None,
        harmful=str(files["harmful"]),
        harmless=str(files["harmless"]),
        **TINY,
        selection=SelectionConfig(**TINY_SELECTION),
    )
    run_pipeline(cfg, tmp_path / "run", model, tok, log=lambda m: None, stop_after="select")
    saved = Direction.load(RunFolder(tmp_path / "run"))
    found = find_direction(
        model, str(files["harmful"]), str(files["harmless"]), tok, **TINY, **TINY_SELECTION
    )
    _same(found, saved)
    assert found.scores["kl"] < 100.0 and set(found.scores) >= {"bypass", "induce", "kl"}
    # the same prompts given as lists (strings or Prompts) instead of dataset specs: the same direction
    harmful = [p.instruction for p in sides["harmful"]]
    listed = find_direction((model, tok), harmful, sides["harmless"], **TINY, **TINY_SELECTION)
    _same(listed, saved)


def test_find_direction_rejects_what_it_cannot_use():
    model, tok = tiny_model("qwen2")
    with pytest.raises(RefdirError, match="unknown setting 'n_trian'"):
        find_direction(model, "builtin:harmful", "builtin:harmless", tok, n_trian=3)
    with pytest.raises(RefdirError, match="needs the tokenizer"):
        find_direction(model, "builtin:harmful", "builtin:harmless")
    with pytest.raises(RefdirError, match="duplicates prompt 1"):
        find_direction(model, ["a b", "a b"], "builtin:harmless", tok, **TINY)


@pytest.fixture(scope="module")
def real_runtime():
    """The 0.5B loaded as ``refdir run --model`` loads it (same options, same batch policy)."""
    from refdir.core.runtime import Runtime

    return Runtime.load(REAL, **RunConfig().load_options())


@real
def test_find_direction_is_the_quick_runs_direction(quick_run, real_runtime):
    # the settings of conftest.QUICK_RUN_FLAGS: --preset quick --induce-threshold=-1e9
    found = find_direction(
        real_runtime, "builtin:harmful", "builtin:harmless", preset="quick", induce_threshold=-1e9
    )
    _same(found, Direction.load(quick_run))


@real
def test_direction_hooks_are_the_evaluations(quick_run, real_runtime):
    """``Direction.load(run).ablate(model)`` / ``.add(model)`` give the logits of the hooks ``refdir
    evaluate --intervention ablate`` / ``actadd`` place (``conditions.condition``)."""
    from refdir.evaluation.conditions import condition
    from refdir.method.refusal import last_logits

    rt, d = real_runtime, Direction.load(quick_run, expect_d_model=real_runtime.adapter.d_model)
    b = rt.encode([p.instruction for p in load_builtin("harmful")[:4]])
    base = last_logits(rt.model, b.input_ids, b.attention_mask)  # [4, vocab]
    for name, ctx in (("ablation", d.ablate(rt.model)), ("actadd-", d.add(rt.model, -1.0))):
        with ctx:
            ours = last_logits(rt.model, b.input_ids, b.attention_mask)
        with condition(rt.model, name, d):
            theirs = last_logits(rt.model, b.input_ids, b.attention_mask)
        assert (ours - theirs).abs().max() <= 1e-5, name
        assert (ours - base).abs().max() > 1e-2, name  # the edit did something
    assert torch.equal(base, last_logits(rt.model, b.input_ids, b.attention_mask))  # hooks removed


def readme_python_example() -> str:
    """The one python block of the README's ``## Python API`` section."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Python API\n") :]
    section = section[: section.index("\n## ", 1)]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return code


def test_the_readme_example_uses_the_public_api():
    code = readme_python_example()
    assert "find_direction(" in code and "max_new_tokens=8" in code
    compile(code, "README.md", "exec")


@real
def test_the_readme_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it saves direction.safetensors / .json in the working folder
    scope: dict = {}
    exec(compile(readme_python_example(), "README.md", "exec"), scope)
    d = scope["direction"]
    n_post = len(d.extra["prompt_format"]["post_instruction_tokens"])
    assert isinstance(d, Direction) and 0 <= d.layer < 24 and -n_post <= d.pos <= -1
    assert d.scores["kl"] < 0.1  # the KL filter stays on
    assert Direction.load(tmp_path / "direction.safetensors").layer == d.layer
