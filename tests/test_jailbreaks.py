"""The jailbreak table (paper Table 2 analogue) of a finished tiny run."""

import json

import pytest

from refdir.cli import main
from refdir.core.io import read_jsonl


@pytest.fixture(scope="module")
def judged_run(tiny_folder, tmp_path_factory):
    from test_cli import LOOSE

    out = tmp_path_factory.mktemp("jb") / "r"
    assert main(["run", "--model", str(tiny_folder), "--out", str(out), *LOOSE, "--judge", "self"]) == 0
    return out


def test_table_rows_match_the_evaluation_and_add_the_suffix_rows(judged_run, capsys):
    run = judged_run
    assert main(["jailbreaks", "--run", str(run)]) == 0
    jb = json.loads((run / "jailbreaks.json").read_text())
    ev = json.loads((run / "eval.json").read_text())
    rows = {r["key"]: r for r in jb["rows"]}
    assert [r["condition"] for r in jb["rows"]] == [
        "direct request",
        "random suffix",
        "-r activation addition",
        "orthogonalized weights",
    ]  # no suffix.json: no GCG row
    assert jb["judges"] == ["substring (paper)", "self"]
    n = len(json.loads((run / "prompts.json").read_text())["eval_harmful"])
    assert all(r["n"] == n for r in jb["rows"])
    for key, cond in (
        ("harmful/baseline", "baseline"),
        ("harmful/actadd-", "actadd-"),
        ("harmful/ortho", "ortho"),
    ):
        r = rows[key]
        assert r["refusal"]["substring (paper)"] == pytest.approx(
            ev["refusal"]["harmful"][cond]["refusal_rate"]
        )
        assert r["compliance"]["substring (paper)"] == pytest.approx(1 - r["refusal"]["substring (paper)"])
    assert rows["harmful/baseline"]["refusal"]["self"] == pytest.approx(
        ev["judge"]["conditions"]["harmful/baseline"]["refusal_rate"]
    )
    assert rows["harmful/random_suffix"]["refusal"]["self"] is not None  # judged here
    gen = read_jsonl(run / "jailbreak_completions.jsonl")
    assert len(gen) == n and {g["condition"] for g in gen} == {"random_suffix"}
    assert "Jailbreaks (paper Table 2)" in (run / "report.html").read_text()
    from refdir.outputs.audit import build_audit, render_audit

    a = build_audit(run)  # the audit page carries the same table
    assert a["jailbreaks"]["rows"] == jb["rows"] and "paper Table 2" in render_audit(a)


def test_gcg_row_when_the_run_has_a_suffix(judged_run, tmp_path):
    (judged_run / "suffix.json").write_text(
        json.dumps({"suffix": "zz yy xx", "n_tokens": 3, "seed": 1, "steps": 2})
    )
    out = tmp_path / "jb.json"
    assert main(["jailbreaks", "--run", str(judged_run), "--out", str(out)]) == 0
    jb = json.loads(out.read_text())
    gcg = next(r for r in jb["rows"] if r["key"] == "harmful/gcg_suffix")
    assert gcg["condition"] == "GCG suffix" and "2 GCG steps" in gcg["note"]
    gen = read_jsonl(judged_run / "jailbreak_completions.jsonl")
    assert sum(g["condition"] == "gcg_suffix" and g["suffix"] == "zz yy xx" for g in gen) == gcg["n"]


def test_needs_a_finished_run(tmp_path, capsys):
    assert main(["jailbreaks", "--run", str(tmp_path)]) == 2
    assert "has no evaluation yet" in capsys.readouterr().err
