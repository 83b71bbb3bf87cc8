"""Bad input: every case gives a one-line message, exit status 2 and writes nothing.

The table below is also rendered into docs/errors.md by ``python tests/test_errors.py``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from refdir.cli import main


def _write(p: Path, text: str) -> str:
    p.write_text(text)
    return str(p)


def _run(model, *extra):
    return ["run", "--model", str(model), "--preset", "quick", "--judge", "none", *extra]


def _direction(tmp: Path, vec: torch.Tensor, model: str = "") -> str:
    from refdir.method.directions import Direction

    Direction(vec, 1, -1, model).save(tmp / "dir" / "direction")
    return str(tmp / "dir")


def _no_template_folder(tmp: Path, tiny: Path) -> str:
    d = tmp / "notemplate"
    shutil.copytree(tiny, d)
    (d / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return str(d)


def _unsupported_folder(tmp: Path) -> str:
    import transformers

    cfg = transformers.MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=640, state_size=4)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    d = tmp / "mamba"
    model.save_pretrained(d)
    from tiny import make_tokenizer

    make_tokenizer().save_pretrained(d)
    return str(d)


def _truncated_folder(tmp: Path, tiny: Path) -> str:
    """A checkpoint whose weights file was cut short, as by an interrupted download."""
    d = tmp / "truncated"
    shutil.copytree(tiny, d)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 3])
    return str(d)


def _run_folder_of_other_model(tmp: Path) -> str:
    d = tmp / "otherrun"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"format": 1, "model": "some/other-model"}))
    return str(d)


def _prompts_only_run(tmp: Path, direction_model: str | None = None) -> str:
    """A run folder with prompts.json and, if ``direction_model`` is given, a direction computed on that
    model."""
    d = tmp / "ponly"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({"format": 1, "model": "x"}))
    (d / "prompts.json").write_text(json.dumps({"harmful_train": [], "eval_harmful": []}))
    if direction_model:
        from refdir.method.directions import Direction

        Direction(torch.randn(64), 1, -1, direction_model).save(d / "direction")
    return str(d)


def _newer_run_folder(tmp: Path) -> str:
    d = tmp / "newrun"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"format": 99}))
    return str(d)


# (case, argv builder, expected message fragment). Builders get (tmp_path, tiny_folder, run_dir).
CASES = [
    ("missing dataset", lambda t, m, r: _run(m, "--harmful", str(t / "nope.json")), "dataset not found"),
    ("empty dataset", lambda t, m, r: _run(m, "--harmful", _write(t / "e.json", "[]")), "empty"),
    (
        "unreadable dataset (not UTF-8)",
        lambda t, m, r: _run(m, "--harmful", str(_bytes(t / "b.txt"))),
        "cannot read",
    ),
    ("malformed JSON", lambda t, m, r: _run(m, "--harmful", _write(t / "m.json", '[\n"a",\n')), "line"),
    (
        "malformed JSONL",
        lambda t, m, r: _run(m, "--harmful", _write(t / "m.jsonl", '{"instruction":"a"}\n{x\n')),
        "line 2",
    ),
    ("malformed CSV", lambda t, m, r: _run(m, "--harmful", _write(t / "m.csv", 'instruction\n"a\n')), "CSV"),
    (
        "CSV without the column",
        lambda t, m, r: _run(m, "--harmful", _write(t / "c.csv", "text\na\n")),
        "column",
    ),
    (
        "duplicate prompts",
        lambda t, m, r: _run(m, "--harmful", _write(t / "d.txt", "a\nb\na\n")),
        "duplicates",
    ),
    ("blank prompts", lambda t, m, r: _run(m, "--harmful", _write(t / "b.json", '["a", " "]')), "blank"),
    (
        "fewer prompts than the sizes",
        lambda t, m, r: _run(m, "--harmful", _write(t / "s.txt", "a\nb\nc\n")),
        "requested",
    ),
    ("non-positive sizes", lambda t, m, r: _run(m, "--n-train", "0"), "positive"),
    (
        "settings file: a size that is not a number",
        lambda t, m, r: _config(t, 'n_eval = "abc"\n'),
        "n_eval: expected a positive integer",
    ),
    (
        "settings file: a model that is not a string",
        lambda t, m, r: _config(t, "model = 3\n"),
        "model: expected a string",
    ),
    (
        "settings file: a selection threshold that is not a number",
        lambda t, m, r: _config(t, '[selection]\nkl_threshold = "x"\n'),
        "selection.kl_threshold: invalid float value",
    ),
    ("unknown model id", lambda t, m, r: _run("no-such-model"), "unknown model"),
    ("model folder without config", lambda t, m, r: _run(str(t)), "config.json"),
    ("model without chat template", lambda t, m, r: _run(_no_template_folder(t, m)), "chat template"),
    ("unsupported architecture", lambda t, m, r: _run(_unsupported_folder(t)), "unsupported architecture"),
    ("corrupt GGUF", lambda t, m, r: _run(_write(t / "bad.gguf", "GGUF\x03garbage")), "GGUF"),
    (
        "interrupted download (truncated weights)",
        lambda t, m, r: _run(_truncated_folder(t, m)),
        "cannot load model",
    ),
    (
        "run folder of another model",
        lambda t, m, r: _run(m, "--out", _run_folder_of_other_model(t)),
        "holds a run",
    ),
    ("run folder of a newer format", lambda t, m, r: _run(m, "--out", _newer_run_folder(t)), "newer refdir"),
    ("output not writable", lambda t, m, r: _run(m, "--out", str(_file(t) / "sub")), "not writable"),
    (
        "direction of wrong d_model",
        lambda t, m, r: [
            "evaluate",
            "--model",
            str(m),
            "--direction",
            _direction(t, torch.randn(65)),
            "--prompts",
            "builtin:harmful",
            "--intervention",
            "ablate",
            "--out",
            str(t / "o.json"),
        ],
        "d_model",
    ),
    (
        "direction with NaN",
        lambda t, m, r: [
            "evaluate",
            "--model",
            str(m),
            "--direction",
            _direction(t, torch.full((64,), float("nan"))),
            "--prompts",
            "builtin:harmful",
            "--intervention",
            "ablate",
            "--out",
            str(t / "o.json"),
        ],
        "NaN",
    ),
    (
        "direction of zero norm",
        lambda t, m, r: [
            "evaluate",
            "--model",
            str(m),
            "--direction",
            _direction(t, torch.zeros(64)),
            "--prompts",
            "builtin:harmful",
            "--intervention",
            "ablate",
            "--out",
            str(t / "o.json"),
        ],
        "zero norm",
    ),
    (
        "direction from another model",
        lambda t, m, r: [
            "evaluate",
            "--model",
            str(m),
            "--direction",
            _direction(t, torch.randn(64), "other/model"),
            "--prompts",
            "builtin:harmful",
            "--intervention",
            "ablate",
            "--out",
            str(t / "o.json"),
        ],
        "computed on model",
    ),
    (
        "missing direction",
        lambda t, m, r: [
            "evaluate",
            "--model",
            str(m),
            "--direction",
            str(t / "none"),
            "--prompts",
            "builtin:harmful",
            "--intervention",
            "ablate",
            "--out",
            str(t / "o.json"),
        ],
        "not found",
    ),
    (
        "--layer out of range",
        lambda t, m, r: [
            "evaluate",
            "--model",
            str(m),
            "--direction",
            _direction(t, torch.randn(64)),
            "--prompts",
            "builtin:harmful",
            "--intervention",
            "actadd",
            "--layer",
            "99",
            "--out",
            str(t / "o.json"),
        ],
        "out of range",
    ),
    (
        "unknown intervention",
        lambda t, m, r: [
            "evaluate",
            "--model",
            str(m),
            "--direction",
            "x",
            "--prompts",
            "builtin:harmful",
            "--intervention",
            "zap",
            "--out",
            "o.json",
        ],
        "invalid choice",
    ),
    (
        "judge a run that was never evaluated",
        lambda t, m, r: ["judge", "--run", str(_run_folder_of_other_model(t))],
        "no evaluation yet",
    ),
    (
        "judge a condition the run lacks",
        lambda t, m, r: [
            "judge",
            "--run",
            _evaluated_run(t),
            "--conditions",
            "harmless/actadd+",
            "harmful/zap",
        ],
        "no completions for",
    ),
    (
        "--device cuda without CUDA",
        lambda t, m, r: _run(m, "--device", "cuda", "--out", str(t / "r")),
        "CUDA is not available" if not torch.cuda.is_available() else "out of memory",
    ),
    ("unknown device", lambda t, m, r: _run(m, "--device", "tpu:0", "--out", str(t / "r")), "unknown device"),
    (
        "--load-in-4bit without bitsandbytes",
        lambda t, m, r: _no_bnb(_run(m, "--load-in-4bit", "--out", str(t / "r"))),
        "pip install bitsandbytes",
    ),
    (
        "device map that misses modules",
        lambda t, m, r: _run(m, "--device-map", _partial_map(t), "--out", str(t / "r")),
        "does not place",
    ),
    (
        "prompt longer than the context",
        lambda t, m, r: [
            "evaluate",
            "--model",
            str(m),
            "--direction",
            _direction(t, torch.randn(64)),
            "--prompts",
            _long_prompt(t),
            "--intervention",
            "ablate",
            "--out",
            str(t / "o.json"),
        ],
        "exceeds the model's context",
    ),
    (
        "out of memory during a stage",
        lambda t, m, r: _oom(_run(m, "--out", str(t / "r"))),
        "out of GPU memory",
    ),
    (
        "--rank above what was built",
        lambda t, m, r: [
            "export",
            "--model",
            str(m),
            "--direction",
            _direction(t, torch.randn(64)),
            "--rank",
            "3",
            "--out",
            str(t / "exp"),
        ],
        "no cone.safetensors",
    ),
    (
        "monitor on a folder without a direction",
        lambda t, m, r: [
            "monitor",
            "--run",
            _prompts_only_run(t),
            "--model",
            str(m),
            "--out",
            str(t / "m.json"),
        ],
        "not found",
    ),
    (
        "cone on another model's run",
        lambda t, m, r: [
            "cone",
            "--run",
            _prompts_only_run(t, "other/model"),
            "--model",
            str(m),
            "--out",
            str(t / "c.json"),
        ],
        "computed on model",
    ),
    ("capabilities: unknown task", lambda t, m, r: _caps(t, m, "--tasks", "no_such_task"), "unknown task"),
    (
        "capabilities: data dir missing a benchmark's files",
        lambda t, m, r: _caps(t, m, "--tasks", "arc_challenge,gsm8k", "--data-dir", _bench_dir(t)),
        "lacks gsm8k's files",
    ),
    (
        "capabilities: lm-eval not installed",
        lambda t, m, r: _no_lm_eval(_caps(t, m, "--tasks", "mmlu")),
        "pip install 'refdir[capabilities]'",
    ),
    (
        "capabilities: direction from another model",
        lambda t, m, r: _caps(
            t,
            m,
            "--tasks",
            "arc_challenge",
            "--data-dir",
            _bench_dir(t),
            "--direction",
            _direction(t, torch.randn(64), "other/model"),
        ),
        "computed on model",
    ),
    (
        "export a trial of a run never searched",
        lambda t, m, r: (
            ["export", "--model", str(m), "--run", _prompts_only_run(t, "x"), "--trial", "3"]
            + ["--out", str(t / "o")]
        ),
        "has no search trial 3",
    ),
    (
        "export --trial without --run",
        lambda t, m, r: ["export", "--model", str(m), "--trial", "3", "--out", str(t / "o")],
        "--trial needs --run",
    ),
    (
        "search: unknown channel norm",
        lambda t, m, r: ["search", "--model", str(m), "--run", _prompts_only_run(t, "x"), "--norms", "rows"],
        "unknown norm rows",
    ),
    (
        "evaluate a trial under activation addition",
        lambda t, m, r: (
            ["evaluate", "--model", str(m), "--direction", _prompts_only_run(t, "x"), "--trial"]
            + ["1", "--intervention", "actadd", "--prompts", "builtin:harmful", "--out", str(t / "o.json")]
        ),
        "--trial takes --intervention ablate",
    ),
    (
        "export into a non-empty folder",
        lambda t, m, r: [
            "export",
            "--model",
            str(m),
            "--direction",
            _direction(t, torch.randn(64)),
            "--out",
            str(_nonempty(t)),
        ],
        "--force",
    ),
    (
        "judge: completions file of another format",
        lambda t, m, r: _judge_file(t, "c.txt", "prompt,completion\n"),
        "unknown completions format",
    ),
    (
        "judge: completions line without a completion",
        lambda t, m, r: _judge_file(t, "c.jsonl", '{"prompt": "p", "completion": "c"}\n{"prompt": "p"}\n'),
        "line 2 has no 'completion' field",
    ),
    (
        "judge: completions file as its own --out",
        lambda t, m, r: _judge_file(t, "c.csv", "prompt,completion\np,c\n", out="c.csv"),
        "is the completions file itself",
    ),
    (
        "judge: endpoint without --judge-model",
        lambda t, m, r: _judge_file(
            t, "c.csv", "prompt,completion\np,c\n", "--judge", "http://127.0.0.1:9/v1"
        ),
        "needs --judge-model",
    ),
    (
        "judge: endpoint not reachable",
        lambda t, m, r: _judge_file(
            t, "c.csv", "prompt,completion\np,c\n", "--judge", "http://127.0.0.1:9/v1", "--judge-model", "m"
        ),
        "cannot reach the judge endpoint http://127.0.0.1:9/v1/chat/completions",
    ),
    (
        "judge: --judge none",
        lambda t, m, r: _judge_file(t, "c.csv", "prompt,completion\np,c\n", "--judge", "none"),
        "--judge none names no judge",
    ),
    (
        "run: a probe judge file that does not exist",
        lambda t, m, r: [*_run(m, "--out", str(t / "r")), "--judge", "probe:nope.safetensors"],
        "--judge probe:nope.safetensors: no probe judge at nope.safetensors",
    ),
    (
        "judge-train: a row without a label",
        lambda t, m, r: _train(
            t, '{"prompt": "p", "completion": "c", "label": "refusal"}\n{"prompt": "p", "completion": "c"}\n'
        ),
        "item 2 has no label",
    ),
    (
        "judge-train: a label outside the three classes",
        lambda t, m, r: _train(t, '{"prompt": "p", "completion": "c", "final_label": "4_other"}\n'),
        "item 1: unknown label '4_other'",
    ),
    (
        "judge-train: one class only",
        lambda t, m, r: _train(t, '{"prompt": "p", "completion": "c", "label": "refusal"}\n' * 2),
        "a probe needs at least two of compliance, refusal, partial",
    ),
    (
        "judge-train: the probe file is a labeled file",
        lambda t, m, r: _train(t, '{"prompt": "p", "completion": "c", "label": "refusal"}\n', out="l.jsonl"),
        "is the completions file itself",
    ),
]


def _train(t: Path, text: str, out: str = "p.safetensors") -> list[str]:
    """``refdir judge-train`` on a labeled file holding ``text`` (never reaches the judge model)."""
    return ["judge-train", "--labeled", _write(t / "l.jsonl", text), "--out", str(t / out)]


def _judge_file(t: Path, name: str, text: str, *extra: str, out: str = "o.json") -> list[str]:
    """``refdir judge --completions FILE`` on a file holding ``text`` (substring judge unless ``extra``)."""
    judge = [] if "--judge" in extra else ["--judge", "substring"]
    return ["judge", "--completions", _write(t / name, text), "--out", str(t / out), *judge, *extra]


def _config(t: Path, text: str) -> list[str]:
    """``refdir run --config FILE`` with a settings file holding ``text`` (its values checked like flags)."""
    return ["run", "--config", _write(t / "run.toml", text), "--out", str(t / "r")]


def _caps(t: Path, m, *extra) -> list[str]:
    return ["capabilities", "--model", str(m), "--out", str(t / "caps.json"), *extra]


def _bench_dir(t: Path) -> str:
    """A data dir holding ARC-Challenge only (one made-up item per split)."""
    d = t / "bench" / "arc_challenge"
    d.mkdir(parents=True)
    item = {
        "id": "q",
        "question": {"stem": "Which?", "choices": [{"text": "a", "label": "A"}, {"text": "b", "label": "B"}]},
        "answerKey": "A",
    }
    for split in ("Test", "Train", "Dev"):
        (d / f"ARC-Challenge-{split}.jsonl").write_text(json.dumps(item) + "\n")
    return str(d.parent)


def _no_lm_eval(argv):
    sys.modules["lm_eval"] = None  # as if not installed (restored by the test)
    return argv


def _no_bnb(argv):
    sys.modules["bitsandbytes"] = None  # as if not installed (restored by the test)
    return argv


def _partial_map(t: Path) -> str:
    f = t / "map.json"
    f.write_text(json.dumps({"model.embed_tokens": "cpu", "model.layers.0": "cpu"}))
    return str(f)


def _long_prompt(t: Path) -> str:
    f = t / "long.txt"
    f.write_text("word " * 40000 + "\n")  # 200,000 characters, one prompt
    return str(f)


def _oom(argv):
    import refdir.run.stages

    def boom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    refdir.run.stages.prepare_prompts = boom  # restored by the test (the stage table calls it by this name)
    return argv


def _evaluated_run(t: Path) -> str:
    """A run folder with an evaluation: the second judge can be asked for its conditions only."""
    d = t / "evaluated"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"format": 1, "model": "some/model"}))
    (d / "eval.json").write_text("{}")
    (d / "completions.jsonl").write_text(
        "".join(
            json.dumps({"split": s, "condition": c, "prompt": "p", "completion": "c", "refused": False})
            + "\n"
            for s, c in (("harmful", "baseline"), ("harmless", "actadd+"))
        )
    )
    return str(d)


def _bytes(p: Path) -> Path:
    p.write_bytes(b"\xff\xfe\x00bad")
    return p


def _file(t: Path) -> Path:
    f = t / "afile"
    f.write_text("x")
    return f


def _nonempty(t: Path) -> Path:
    d = t / "full"
    d.mkdir(exist_ok=True)
    (d / "keep.txt").write_text("x")
    return d


def _snapshot(root: Path) -> set:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("case,argv,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, argv, fragment, tmp_path, tiny_folder, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REFDIR_CACHE", str(tmp_path / "cache"))
    import refdir.run.stages

    monkeypatch.setattr(refdir.run.stages, "prepare_prompts", refdir.run.stages.prepare_prompts)
    monkeypatch.setitem(sys.modules, "bitsandbytes", sys.modules.get("bitsandbytes"))
    try:  # imported first, so that the "not installed" case's None is undone (when it is installed)
        import lm_eval  # noqa: F401

        monkeypatch.setitem(sys.modules, "lm_eval", sys.modules["lm_eval"])
    except ImportError:
        pass
    args = argv(tmp_path, tiny_folder, None)
    before = _snapshot(tmp_path)
    with (
        pytest.raises(SystemExit) if case in ("non-positive sizes", "unknown intervention") else _nullctx()
    ) as exc:
        rc = main(args)
    if exc is not None:
        rc = exc.value.code
    err = capsys.readouterr().err.strip().splitlines()
    err = [
        e for e in err if not e.startswith("[refdir]")
    ]  # progress lines (a stage began, a first-use notice)
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("refdir: error:"), err
    assert fragment.lower() in err[0].lower(), err[0]
    assert "Traceback" not in err[0]
    created = {c for c in _snapshot(tmp_path) - before if not c.startswith("cache")}
    if case == "out of memory during a stage":  # the run folder stays, with only completed stages: none
        created -= {"r", "r/config.json"}
    assert not created, created


def test_docs_errors_md_has_a_row_for_every_case():
    """docs/errors.md is rendered from CASES (``python tests/test_errors.py``): a new case needs its row,
    with its fragment in the message shown."""
    doc = (Path(__file__).parents[1] / "docs" / "errors.md").read_text()
    rows = {
        line.split(" | ")[0].removeprefix("| "): line for line in doc.splitlines() if line.startswith("| ")
    }
    missing = [case for case, _, fragment in CASES if fragment.lower() not in rows.get(case, "").lower()]
    assert missing == []


class _nullctx:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def test_missing_and_wrong_version_model_packages(monkeypatch, tmp_path, capsys):
    from refdir.core import models

    fake = models.OfflineModel("fake-model", ("refdir-no-such-package-part1",), 1, "0" * 64, "models-small")
    monkeypatch.setitem(models.OFFLINE_MODELS, "fake-model", fake)
    assert main(["run", "--model", "fake-model"]) == 2
    err = capsys.readouterr().err
    assert (
        "pip install" in err and "refdir-no-such-package-part1" in err and len(err.strip().splitlines()) == 1
    )
    # wrong version: the installed parts do not assemble to the pinned size/sha256
    monkeypatch.setenv("REFDIR_CACHE", str(tmp_path / "cache"))
    wrong = models.OfflineModel("wrong-model", ("pytest",), 123, "0" * 64, "models-small")
    monkeypatch.setattr(models, "_package_data_files", lambda pkg: [Path(__file__)])
    monkeypatch.setitem(models.OFFLINE_MODELS, "wrong-model", wrong)
    assert main(["run", "--model", "wrong-model"]) == 2
    err = capsys.readouterr().err
    assert "sha256" in err and "reinstall" in err
    assert err.index("first use of 'wrong-model'") < err.index("sha256")  # said before the slow work


@pytest.mark.parametrize("in_memory", [False, True])
def test_disk_full_during_export_leaves_nothing(tiny_folder, tmp_path, monkeypatch, capsys, in_memory):
    import transformers

    import refdir.outputs.export

    d = _direction(tmp_path, torch.randn(64))

    def full(self, *a, **k):
        raise OSError(28, "No space left on device")

    if in_memory:
        monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full)
    else:  # the second tensor of the streamed checkpoint hits a full disk
        monkeypatch.setattr(refdir.outputs.export._ShardWriter, "close", full)
    out = tmp_path / "exp"
    assert (
        main(
            ["export", "--model", str(tiny_folder), "--direction", d, "--out", str(out)]
            + ["--in-memory"] * in_memory
        )
        == 2
    )
    assert "No space left" in capsys.readouterr().err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".exp")]


def render_table() -> str:
    """Run every case and tabulate the real one-line message (paths shortened)."""
    import contextlib
    import io
    import os
    import tempfile

    from tiny import tiny_model

    rows = ["| case | message |", "|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        os.environ["REFDIR_CACHE"] = str(t / "cache")
        model, tok = tiny_model("qwen2")
        (t / "tinyq").mkdir()
        model.save_pretrained(t / "tinyq")
        tok.save_pretrained(t / "tinyq")
        import refdir.run.stages

        with contextlib.suppress(ImportError):
            import lm_eval  # noqa: F401  (so that the "not installed" case can be undone)
        screen, bnb, lme = (
            refdir.run.stages.prepare_prompts,
            sys.modules.get("bitsandbytes"),
            sys.modules.get("lm_eval"),
        )
        for case, argv, _ in CASES:
            work = t / case.replace(" ", "_").replace("/", "_")
            work.mkdir()
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.suppress(SystemExit):
                main(argv(work, t / "tinyq", None))
            refdir.run.stages.prepare_prompts = screen  # the cases that simulate failures patch these
            if bnb is None:
                sys.modules.pop("bitsandbytes", None)
            else:
                sys.modules["bitsandbytes"] = bnb
            if lme is not None:
                sys.modules["lm_eval"] = lme
            line = err.getvalue().strip().splitlines()[-1].replace(str(work), "…").replace(str(t), "…")
            rows.append(f"| {case} | `{line.replace('|', '/')}` |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(render_table() + "\n")
