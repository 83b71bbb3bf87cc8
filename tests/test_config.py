"""One config schema: flags, presets, RunConfig and the TOML file agree; precedence
defaults < preset < file < flags."""

import json
import subprocess
import sys

import pytest

from refdir.cli import build_parser, main
from refdir.core.errors import RefdirError
from refdir.run.settings import RunConfig, resolve


def test_precedence(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('preset = "quick"\nn_eval = 10\nseed = 7\n[selection]\nkl_threshold = 0.5\n')
    cfg = resolve({"n_eval": 12}, str(f))
    # preset, flag, file
    assert (cfg.n_train, cfg.n_eval, cfg.seed, cfg.selection.kl_threshold) == (32, 12, 7, 0.5)
    # preset; calibrated by default
    assert cfg.max_new_tokens == 24 and cfg.selection.induce_threshold is None
    assert resolve({}, None, "paper").max_new_tokens == 512
    assert resolve({}).to_json() == RunConfig().to_json()


def test_every_setting_with_a_flag_parses_into_the_config():
    a = build_parser().parse_args(
        [
            "run",
            "--n-train",
            "5",
            "--no-prune",
            "--device",
            "cpu",
            "--ce-text",
            "none",
            "--template-kwargs",
            '{"b": 1, "a": 2}',
            "--refusal-tokens",
            "I",
            "As",
        ]
    )
    cfg = resolve({k: v for k, v in vars(a).items() if k not in {"cmd", "debug", "config", "out", "preset"}})
    assert cfg.n_train == 5 and cfg.selection.prune is False and cfg.device == "cpu" and cfg.ce_text is None
    assert cfg.template_kwargs == '{"a": 2, "b": 1}' and cfg.refusal_tokens == ["I", "As"]
    assert "n_val" not in vars(a)  # flags not given leave no attribute: the file and preset keep theirs


@pytest.mark.parametrize(
    "text,msg",
    [
        ("n_evall = 3\n", "unknown setting 'n_evall'"),
        ("[selection]\nkl = 1\n", "unknown setting 'selection.kl'"),
        ("n_eval = \n", "not valid TOML"),
        ('preset = "huge"\n', "unknown preset"),
    ],
)
def test_bad_config_files(tmp_path, text, msg):
    f = tmp_path / "run.toml"
    f.write_text(text)
    with pytest.raises(RefdirError, match=msg):
        resolve({}, str(f))


def test_run_records_the_resolved_config(tiny_folder, tmp_path):
    f = tmp_path / "run.toml"
    f.write_text(
        f'model = "{tiny_folder}"\npreset = "quick"\nfilter = "none"\nmin_refusal_rate = 0.0\n'
        "n_train = 12\nn_val = 6\nn_eval = 6\nmax_new_tokens = 4\nseed = 3\n"
    )
    out = tmp_path / "r"
    assert (
        main(["run", "--config", str(f), "--out", str(out), "--stop-after", "prompts", "--n-eval", "5"]) == 0
    )
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["n_train"], cfg["n_eval"], cfg["seed"], cfg["filter"]) == (12, 5, 3, "none")
    assert cfg["load"]["dtype"] == "float32" and cfg["batch_policy"]["source"] == "defaults"


def test_help_imports_neither_torch_nor_transformers():
    code = (
        "import sys\nfrom refdir.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "try:\n    main(['run', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_models_command_is_torch_free():
    code = (
        "import sys\nfrom refdir.cli import main\nmain(['models'])\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize(
    "text,key,what",
    [
        ('n_eval = "abc"\n', "n_eval", "expected a positive integer, got 'abc'"),
        ("model = 3\n", "model", "expected a string, got 3"),
        ('[selection]\nkl_threshold = "x"\n', "selection.kl_threshold", "invalid float value: 'x'"),
    ],
)
def test_a_bad_value_in_the_settings_file_stops_before_anything(
    tmp_path, capsys, monkeypatch, text, key, what
):
    """The file's values pass the flags' checks: one line naming the key, exit 2, no model, no folder."""
    import refdir.core.models
    import refdir.core.runtime

    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(refdir.core.models, "load_model", no_model)
    monkeypatch.setattr(refdir.core.runtime.Runtime, "load", no_model)
    f = tmp_path / "run.toml"
    f.write_text(text)
    out = tmp_path / "r"
    assert main(["run", "--config", str(f), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"refdir: error: --config {f}: {key}: {what}"]
    assert not out.exists()


def test_a_file_value_is_read_as_the_same_flag_would_be(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text(
        'n_eval = "7"\nseed = 3\nmin_refusal_rate = 1\nfilter = "none"\nce_text = "none"\n'
        'refusal_tokens = ["I", "As"]\ntemplate_kwargs = {b = 1, a = 2}\n'
        "[selection]\nkl_threshold = 2\nchunk = 4\nprune = false\n"
    )
    flags = [
        "run",
        "--n-eval",
        "7",
        "--seed",
        "3",
        "--min-refusal-rate",
        "1",
        "--filter",
        "none",
        "--ce-text",
        "none",
        "--no-prune",
        "--refusal-tokens",
        "I",
        "As",
        "--template-kwargs",
        '{"b": 1, "a": 2}',
        "--kl-threshold",
        "2",
    ]
    a = build_parser().parse_args(flags)
    by_flags = resolve(
        {k: v for k, v in vars(a).items() if k.startswith("selection.") or k in RunConfig().__dict__}
    )
    by_file = resolve({}, str(f))
    by_flags.selection.chunk = 4  # a file-only setting
    assert by_file.to_json() == by_flags.to_json()
    assert (by_file.n_eval, by_file.min_refusal_rate, by_file.selection.kl_threshold) == (7, 1.0, 2.0)
    assert by_file.template_kwargs == '{"a": 2, "b": 1}' and by_file.ce_text is None


@pytest.mark.parametrize(
    "text,msg",
    [
        ("n_train = 0\n", "n_train: sizes must be positive, got 0"),
        ("seed = 1.5\n", "seed: invalid int value: '1.5'"),
        ('filter = "zz"\n', "filter: invalid choice: 'zz'"),
        ("prune = 1\n", "unknown setting 'prune'"),
        ("[selection]\nprune = 1\n", "selection.prune: expected true or false, got 1"),
        ("[selection]\nchunk = 0\n", "selection.chunk: sizes must be positive"),
        ('refusal_tokens = "I"\n', "refusal_tokens: expected a non-empty list"),
        ("selection = 3\n", "selection: expected a \\[selection\\] table"),
    ],
)
def test_file_values_fail_the_flags_checks(tmp_path, text, msg):
    f = tmp_path / "run.toml"
    f.write_text(text)
    with pytest.raises(RefdirError, match=msg):
        resolve({}, str(f))
