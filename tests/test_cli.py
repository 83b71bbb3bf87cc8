"""End-to-end CLI on a tiny checkpoint folder: run, resume, evaluate, export, bad input."""

import json
import subprocess
import sys

import pytest
import torch

from refdir.cli import main

LOOSE = [
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
    "12",
    "--n-val",
    "6",
    "--n-eval",
    "6",
    "--max-new-tokens",
    "4",
    "--judge",
    "none",  # a tiny run never loads the probe judge's 0.5B model
]


@pytest.fixture(scope="module")
def tiny_run(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    assert main(["run", "--model", str(tiny_folder), "--out", str(out), *LOOSE]) == 0
    return out


def test_run_writes_every_artifact(tiny_run):
    for name in (
        "config.json",
        "prompts.json",
        "candidates.safetensors",
        "selection.json",
        "direction.safetensors",
        "heatmaps.png",
        "refusal_rates.png",
        "direction.json",
        "eval.json",
        "completions.jsonl",
        "report.html",
        "summary.json",
        "stages.json",
    ):
        assert (tiny_run / name).exists(), name
    ev = json.loads((tiny_run / "eval.json").read_text())
    assert ev["ortho_check"]["max_abs_logit_diff_vs_ablation"] < 1e-4
    assert set(ev["refusal"]["harmful"]) == {"baseline", "ablation", "actadd-", "ortho"}
    html = (tiny_run / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 2
    pf = json.loads((tiny_run / "prompts.json").read_text())["prompt_format"]
    assert "<instruction>" in pf["example"] and "system" in pf["example"]


def test_second_judge_is_reported(tiny_run, tiny_folder, tmp_path):
    import shutil

    run = tmp_path / "j"
    shutil.copytree(tiny_run, run)
    assert main(["run", "--model", str(tiny_folder), "--out", str(run), *LOOSE, "--judge", "self"]) == 0
    ev = json.loads((run / "eval.json").read_text())
    j = ev["judge"]["conditions"]["harmful/baseline"]
    assert 0 <= j["agreement"] <= 1 and len(j["labels"]) == ev["refusal"]["harmful"]["baseline"]["n"]
    # the chat judge also labels the harmless conditions (induced refusals phrased otherwise)
    assert {"harmless/baseline", "harmless/actadd+"} <= set(ev["judge"]["conditions"])
    assert "Second judge" in (run / "report.html").read_text()


def test_judge_command_labels_a_finished_run(tiny_run, tmp_path, capsys):
    """`refdir judge` adds the second judge from stored completions, without regenerating them."""
    import shutil

    from refdir.evaluation.judges import ChatJudge

    run = tmp_path / "jc"
    shutil.copytree(tiny_run, run)
    comps = (run / "completions.jsonl").read_bytes()
    assert main(["judge", "--run", str(run), "--judge", "self"]) == 0  # the default is the probe
    ev = json.loads((run / "eval.json").read_text())
    assert (run / "completions.jsonl").read_bytes() == comps
    rows = [json.loads(x) for x in comps.decode().splitlines()]
    sel = [r for r in rows if r["split"] == "harmless" and r["condition"] == "actadd+"]
    from refdir.core.models import load_model
    from refdir.core.templates import tokenize_prompts
    from refdir.evaluation.judges import JUDGE_CHARS, JUDGE_PROMPT
    from refdir.method.refusal import last_logits

    model, tok = load_model(json.loads((run / "config.json").read_text())["model"])
    judge = ChatJudge(model, tok)
    want = []
    for r in sel:  # reference: one plain forward per completion, probabilities summed over Yes/No variants
        b = tokenize_prompts(
            tok, [JUDGE_PROMPT.format(prompt=r["prompt"], completion=r["completion"][:JUDGE_CHARS])]
        )
        p = torch.softmax(last_logits(model, b.input_ids, b.attention_mask)[0].double(), -1)
        want.append("refusal" if p[judge.yes_ids].sum() > p[judge.no_ids].sum() else "compliance")
    got = ev["judge"]["conditions"]["harmless/actadd+"]
    assert got["labels"] == want  # bucketed, prefix-shared judge == one prompt at a time
    assert abs(got["refusal_rate"] - sum(x != "compliance" for x in want) / len(want)) < 1e-9
    assert "second judge" in capsys.readouterr().out
    assert json.loads((run / "summary.json").read_text())["judge_refusal"]["harmless/actadd+"] == round(
        got["refusal_rate"], 3
    )
    assert main(["judge", "--run", str(run), "--judge", "self", "--conditions", "harmless/actadd+"]) == 0
    assert set(json.loads((run / "eval.json").read_text())["judge"]["conditions"]) == {"harmless/actadd+"}
    # self+evasive: the same refusal verdicts; the other replies are asked about evasion against the request
    assert (
        main(["judge", "--run", str(run), "--judge", "self+evasive", "--conditions", "harmless/actadd+"]) == 0
    )
    ev_labels = json.loads((run / "eval.json").read_text())["judge"]["conditions"]["harmless/actadd+"][
        "labels"
    ]
    assert [x == "refusal" for x in ev_labels] == [x == "refusal" for x in want]
    assert set(ev_labels) <= {"refusal", "compliance", "evasive"}
    assert "{prompt}" not in JUDGE_PROMPT  # the refusal question shows the reply alone (see evaluation.py)
    assert main(["judge", "--run", str(run), "--conditions", "harmless/nothing"]) == 2
    assert "no completions for harmless/nothing" in capsys.readouterr().err


def test_rerun_reuses_every_stage(tiny_run, tiny_folder, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in tiny_run.iterdir() if p.suffix == ".safetensors"}
    assert main(["run", "--model", str(tiny_folder), "--out", str(tiny_run), *LOOSE]) == 0
    err = capsys.readouterr().err
    assert err.count("reused") == 4
    after = {p.name: p.stat().st_mtime_ns for p in tiny_run.iterdir() if p.suffix == ".safetensors"}
    assert before == after


def test_changed_seed_recomputes(tiny_run, tiny_folder, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(tiny_run, out)
    assert (
        main(
            [
                "run",
                "--model",
                str(tiny_folder),
                "--out",
                str(out),
                *LOOSE,
                "--seed",
                "7",
                "--stop-after",
                "prompts",
            ]
        )
        == 0
    )
    assert "reused" not in capsys.readouterr().err


def test_evaluate_command(tiny_run, tiny_folder, tmp_path):
    out = tmp_path / "e.json"
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(tiny_folder),
                "--direction",
                str(tiny_run),
                "--prompts",
                "builtin:harmful",
                "--n",
                "3",
                "--intervention",
                "ablate",
                "--max-new-tokens",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert set(res) >= {"refusal_rate", "n", "items"} and res["n"] == 3
    assert set(res["items"][0]) >= {"prompt", "refused", "completion"}


def test_export_loads_with_plain_transformers(tiny_run, tiny_folder, tmp_path):
    out = tmp_path / "exported"
    assert main(["export", "--model", str(tiny_folder), "--direction", str(tiny_run), "--out", str(out)]) == 0
    meta = json.loads((out / "refdir.json").read_text())
    assert meta["layer"] >= 0 and meta["direction_norm"] > 0
    code = f"""
import torch, transformers, json
m = transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()
ids = torch.tensor([[3, 17, 40, 99, 5, 4]])
print(json.dumps(m(input_ids=ids).logits[0, -1].tolist()))
"""
    got = torch.tensor(
        json.loads(
            subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            .stdout.strip()
            .splitlines()[-1]
        )
    )
    from refdir.core.models import load_model
    from refdir.method.directions import load_direction
    from refdir.method.interventions import directional_ablation

    model, _ = load_model(str(tiny_folder))
    with directional_ablation(model, load_direction(tiny_run).vector), torch.no_grad():
        want = model(input_ids=torch.tensor([[3, 17, 40, 99, 5, 4]])).logits[0, -1]
    assert (got - want).abs().max() < 1e-4
    # a second export into the same folder needs --force
    assert main(["export", "--model", str(tiny_folder), "--direction", str(tiny_run), "--out", str(out)]) == 2


def test_suffix_and_analysis_commands(tiny_run, tiny_folder, tmp_path):
    import shutil

    run = tmp_path / "r"
    shutil.copytree(tiny_run, run)
    assert (
        main(
            [
                "suffix",
                "--model",
                str(tiny_folder),
                "--run",
                str(run),
                "--steps",
                "2",
                "--n-prompts",
                "2",
                "--n-tokens",
                "4",
                "--topk",
                "8",
                "--search-batch",
                "4",
                "--n-eval",
                "3",
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
    s = json.loads((run / "suffix.json").read_text())
    assert set(s["refusal_rate"]) == {"none", "random", "adversarial"} and s["steps"] == 2
    assert (
        main(["analyze-suffix", "--model", str(tiny_folder), "--run", str(run), "--n", "4", "--top-k", "3"])
        == 0
    )
    a = json.loads((run / "suffix_analysis.json").read_text())
    assert len(a["top_heads"]) == 3 and set(a["cosine_per_layer"]) >= {"harmful", "harmful+adversarial"}
    assert "Adversarial suffix analysis" in (run / "report.html").read_text()
    f = tmp_path / "suf.txt"
    f.write_text("zz yy xx")
    assert (
        main(
            [
                "analyze-suffix",
                "--model",
                str(tiny_folder),
                "--run",
                str(run),
                "--n",
                "3",
                "--suffix-file",
                str(f),
            ]
        )
        == 0
    )


def test_compare_base_command(tiny_run, tiny_folder, tmp_path):
    out = tmp_path / "cb.json"
    assert (
        main(
            [
                "compare-base",
                "--chat",
                str(tiny_folder),
                "--base",
                str(tiny_folder),
                "--direction",
                str(tiny_run),
                "--n",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())["cosine"]
    # same model as chat and base: the chat side (with template prefix) differs from the bare base side
    assert len(res["harmful"]["chat"]["mean"]) == 4


@pytest.mark.skipif(__import__("shutil").which("chromium") is None, reason="Debian chromium not installed")
def test_report_renders_in_headless_chromium(tiny_run, tmp_path):
    png = tmp_path / "shot.png"
    subprocess.run(
        [
            "bash",
            str(__import__("pathlib").Path(__file__).parents[1] / "scripts" / "screenshot_report.sh"),
            str(tiny_run),
            str(png),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20000  # a rendered page, not a blank one


def test_extract_then_select_commands(tiny_folder, tmp_path, capsys):
    out = tmp_path / "es"
    assert main(["extract", "--model", str(tiny_folder), "--out", str(out), *LOOSE]) == 0
    assert (out / "candidates.safetensors").exists() and not (out / "selection.json").exists()
    from refdir.core.io import load_tensors

    cands = load_tensors(out / "candidates.safetensors")["directions"]
    meta = json.loads((out / "candidates.json").read_text())
    assert list(cands.shape) == meta["shape"] and meta["axes"] == ["position", "layer", "d_model"]
    assert main(["select", "--out", str(out), "--kl-threshold", "100", "--induce-threshold=-1e9"]) == 0
    assert "extract: reused" in capsys.readouterr().err
    d = json.loads((out / "direction.json").read_text())
    for key in (
        "model",
        "layer",
        "position",
        "token",
        "bypass",
        "induce",
        "kl",
        "refusal_tokens",
        "sizes",
        "seed",
    ):
        assert key in d, key
    # the same folder with the COSMIC selector: its cosine scores and the paper's scores of its choice
    assert main(["select", "--out", str(out), "--kl-threshold", "100", "--selector", "cosmic"]) == 0
    d = json.loads((out / "direction.json").read_text())
    sel = json.loads((out / "selection.json").read_text())
    assert sel["config"]["selector"] == "cosmic" and sel["baseline"]["selector"] == "cosmic"
    for key in ("cosmic_refusal", "cosmic_steering", "bypass", "induce", "kl"):
        assert key in d["scores"], key


def test_monitor_command(tiny_run, tiny_folder, tmp_path):
    out = tmp_path / "mon.json"
    assert (
        main(
            [
                "monitor",
                "--run",
                str(tiny_run),
                "--model",
                str(tiny_folder),
                "--prompts",
                "builtin:harmless",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert len(res["items"]) > 0 and 0 <= res["evaluation"]["direction"]["auroc"] <= 1
    assert "Refusal monitor" in (tiny_run / "report.html").read_text()


def test_cone_command_and_rank_in_evaluate_and_export(tiny_run, tiny_folder, tmp_path):
    out = tmp_path / "cone.json"
    assert (
        main(
            [
                "cone",
                "--run",
                str(tiny_run),
                "--model",
                str(tiny_folder),
                "--max-rank",
                "2",
                "--max-new-tokens",
                "4",
                "--refine",
                "--refine-steps",
                "3",
                "--kl-budget",
                "1e9",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert [r["rank"] for r in res["ranks"]] == [1, 2] and "Refusal cone" in (
        tiny_run / "report.html"
    ).read_text()
    method = res["ranks"][1]["method"]
    assert "gradient refinement, 3 steps" in method and "KL <= 1e+09" in method
    ev = tmp_path / "ev.json"
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(tiny_folder),
                "--direction",
                str(tiny_run),
                "--rank",
                "2",
                "--prompts",
                "builtin:harmful",
                "--n",
                "4",
                "--max-new-tokens",
                "4",
                "--intervention",
                "ablate",
                "--out",
                str(ev),
            ]
        )
        == 0
    )
    assert json.loads(ev.read_text())["rank"] == 2
    assert (
        main(
            [
                "export",
                "--model",
                str(tiny_folder),
                "--direction",
                str(tiny_run),
                "--rank",
                "2",
                "--out",
                str(tmp_path / "exp"),
            ]
        )
        == 0
    )
    from refdir.core.models import load_model
    from refdir.core.templates import tokenize_prompts
    from refdir.method.directions import load_subspace
    from refdir.method.interventions import subspace_ablation
    from refdir.method.refusal import last_logits

    base, tok = load_model(str(tiny_folder))
    exported, _ = load_model(str(tmp_path / "exp"))
    b = tokenize_prompts(tok, ["Write a poem about rain.", "Name a color."])
    with subspace_ablation(base, load_subspace(tiny_run, 2)):
        want = last_logits(base, b.input_ids, b.attention_mask)
    assert (last_logits(exported, b.input_ids, b.attention_mask) - want).abs().max() < 1e-4
    assert (
        main(
            [
                "export",
                "--model",
                str(tiny_folder),
                "--direction",
                str(tiny_run),
                "--rank",
                "9",
                "--out",
                str(tmp_path / "exp9"),
            ]
        )
        == 2
    )  # the cone holds ranks 1..2


def test_audit_of_a_finished_run(tiny_run, tiny_folder, tmp_path):
    out = tmp_path / "audit"
    assert (
        main(
            [
                "audit",
                "--run",
                str(tiny_run),
                "--model",
                str(tiny_folder),
                "--max-rank",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    a = json.loads((out / "audit.json").read_text())
    ev = json.loads((tiny_run / "eval.json").read_text())
    assert a["baseline_refusal"]["harmful"] == ev["refusal"]["harmful"]["baseline"]["refusal_rate"]
    assert {r["method"] for r in a["removal"]} >= {"directional ablation", "orthogonalized weights"}
    assert a["cone"]["ranks"][0]["rank"] == 1 and a["monitor"]["reads"]["direction"]["auroc"] is not None
    page = (out / "audit.html").read_text()
    assert "What removes refusal" in page and "<script" not in page  # self-contained, no scripts
    pairs = json.loads((tiny_run / "prompts.json").read_text())["ce_text"]  # every number says its n
    assert a["cost"]["ce_harmless_text"] and a["cost"]["n_ce_text"] == len(pairs) > 0
    assert f"{len(pairs)} texts" in page


def test_audit_needs_a_run_or_a_model(tmp_path, capsys):
    assert main(["audit", "--out", str(tmp_path / "a")]) == 2
    assert "pass --run RUN" in capsys.readouterr().err


def test_audit_measures_what_is_missing_on_one_loaded_model(tiny_run, tiny_folder, tmp_path, monkeypatch):
    """The cone and the monitor are library calls on one runtime: the model loads once for both."""
    import shutil

    import refdir.core.runtime

    run = tmp_path / "r"
    shutil.copytree(tiny_run, run)
    for name in ("cone.json", "cone.safetensors", "monitor.json", "monitor_items.json"):
        (run / name).unlink(missing_ok=True)
    loads = []
    real = refdir.core.runtime.Runtime.load.__func__

    def counted(cls, *a, **k):
        loads.append(a[0])
        return real(cls, *a, **k)

    monkeypatch.setattr(refdir.core.runtime.Runtime, "load", classmethod(counted))
    argv = ["audit", "--run", str(run), "--model", str(tiny_folder), "--max-rank", "2", "--out"]
    assert main([*argv, str(tmp_path / "a")]) == 0
    assert loads == [str(tiny_folder)]
    prompts = json.loads((run / "prompts.json").read_text())
    cone = json.loads((run / "cone.json").read_text())
    assert [r["rank"] for r in cone["ranks"]] == [1, 2] and cone["max_new_tokens"] == 64
    assert {r["n"] for r in cone["ranks"]} == {len(prompts["eval_harmful"])}
    mon = json.loads((run / "monitor.json").read_text())
    assert mon["n_evaluation"] == {
        "harmful": len(prompts["eval_harmful"]),
        "harmless": len(prompts["eval_harmless"]),
    }
    assert json.loads((run / "monitor_items.json").read_text())["items"] == [] and "items" not in mon
    assert main([*argv, str(tmp_path / "b")]) == 0 and len(loads) == 1  # nothing missing: no model


def test_evaluate_reads_the_direction_once(tiny_run, tiny_folder, tmp_path, monkeypatch):
    import refdir.method.directions

    calls = []
    real = refdir.method.directions.load_direction

    def counted(*a, **k):
        calls.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr(refdir.method.directions, "load_direction", counted)
    out = tmp_path / "e.json"
    argv = [
        "evaluate",
        "--model",
        str(tiny_folder),
        "--direction",
        str(tiny_run),
        "--prompts",
        "builtin:harmful",
    ]
    assert (
        main([*argv, "--n", "2", "--max-new-tokens", "2", "--intervention", "none", "--out", str(out)]) == 0
    )
    assert calls == [str(tiny_run)] and json.loads(out.read_text())["n"] == 2
