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
