"""Over-refusal in every evaluation: XSTest's safe and unsafe sets under each condition, end to end on a
tiny checkpoint (numbers only: generated text is never asserted on)."""

import json
import shutil
from collections import Counter

import pytest
from test_cli import LOOSE  # the tiny run's settings

from refdir.cli import main
from refdir.evaluation.xstest import SETS, stratified, xstest_jobs, xstest_prompts
from refdir.method.data import Prompt, load_builtin
from refdir.outputs.audit import write_audit


def test_stratified_subset_is_fixed_and_spread_over_the_types():
    safe = load_builtin("xstest-safe")
    a = stratified(safe, 50)
    assert a == stratified(safe, 50) and len(a) == len({p.instruction for p in a}) == 50
    assert set(Counter(p.category for p in a).values()) == {5}  # ten types, five each
    unsafe = Counter(p.category for p in stratified(load_builtin("xstest-unsafe"), 50))
    assert sorted(unsafe.values()) == [6] * 6 + [7] * 2  # eight types: 50 = 8 * 6 + 2
    assert len(stratified(safe, 1000)) == 250 and stratified(safe, 0) == []
    assert stratified(safe, 20)[:10] == a[:10]  # a smaller subset is a prefix of a larger one
    toy = [Prompt(f"{c}{i}", c) for c in "ab" for i in range(3)]
    assert Counter(p.category for p in stratified(toy, 5)) == {"a": 3, "b": 2}


def test_jobs_cover_every_set_and_hooked_condition():
    jobs = xstest_jobs(xstest_prompts(4))
    assert sorted(j.name for j in jobs) == sorted(
        f"{s}/{c}" for s in SETS for c in ("baseline", "ablation", "actadd+")
    )
    assert all(len(j.prompts) == len(j.categories) == 4 for j in jobs)
    assert xstest_prompts(0) == {} and xstest_jobs({}) == []


@pytest.fixture(scope="module")
def xs_run(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("xs") / "r"
    assert main(["run", "--model", str(tiny_folder), "--out", str(out), *LOOSE, "--overrefusal-n", "10"]) == 0
    return out


def _rows(run):
    return [json.loads(x) for x in (run / "completions.jsonl").read_text().splitlines()]


def test_evaluation_writes_the_overrefusal_block(xs_run, tmp_path):
    ev = json.loads((xs_run / "eval.json").read_text())
    block = ev["overrefusal"]
    assert block["n_requested"] == 10 and block["judge"] is None and "XSTest" in block["source"]
    assert set(block["sets"]) == set(SETS)
    for name, s in block["sets"].items():
        assert s["n"] == 10 and sum(s["per_type"].values()) == 10
        assert set(s["conditions"]) == {"baseline", "ablation", "actadd+", "ortho"}
        for c, v in s["conditions"].items():
            assert v["n"] == 10 and 0 <= v["refusal_rate"] <= 1 and v["judge_refusal_rate"] is None
        assert s["conditions"]["ortho"]["from"] == "ablation (logit-equivalent)"
        assert s["conditions"]["ortho"]["refusal_rate"] == s["conditions"]["ablation"]["refusal_rate"]
    # the other keys are as before: the harmful/harmless splits hold only their own conditions
    assert set(ev["refusal"]) == {"harmful", "harmless"}
    counts = Counter((r["split"], r["condition"]) for r in _rows(xs_run))
    for s in SETS:
        for c in ("baseline", "ablation", "actadd+"):
            assert counts[(s, c)] == 10
    rates = [
        r["refused"] for r in _rows(xs_run) if r["split"] == "xstest-safe" and r["condition"] == "baseline"
    ]
    assert block["sets"]["xstest-safe"]["conditions"]["baseline"]["refusal_rate"] == sum(rates) / 10
    summary = json.loads((xs_run / "summary.json").read_text())["overrefusal"]
    assert summary["xstest-unsafe"]["actadd+"]["n"] == 10 and set(summary) == set(SETS)
    page = (xs_run / "report.html").read_text()
    assert "Over-refusal (XSTest)" in page and "Röttger" in page and "xstest-safe n=10" in page
    audit = write_audit(xs_run, tmp_path / "audit")
    assert "Over-refusal (XSTest)" in audit.read_text()
    a = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert a["overrefusal"]["sets"]["xstest-safe"]["n"] == 10


def test_changing_overrefusal_n_reruns_the_evaluation_and_zero_turns_it_off(
    xs_run, tiny_folder, tmp_path, capsys
):
    run = tmp_path / "r"
    shutil.copytree(xs_run, run)
    capsys.readouterr()
    assert main(["run", "--model", str(tiny_folder), "--out", str(run), *LOOSE, "--overrefusal-n", "10"]) == 0
    assert capsys.readouterr().err.count("reused") == 4
    assert main(["run", "--model", str(tiny_folder), "--out", str(run), *LOOSE, "--overrefusal-n", "0"]) == 0
    err = capsys.readouterr().err
    assert err.count("reused") == 3 and "evaluate: reused" not in err
    ev = json.loads((run / "eval.json").read_text())
    assert "overrefusal" not in ev
    assert {r["split"] for r in _rows(run)} == {"harmful", "harmless"}  # no extra generation
    assert len(_rows(run)) == 5 * 6
    assert json.loads((run / "summary.json").read_text())["overrefusal"] == {}
    assert "Over-refusal (XSTest)" not in (run / "report.html").read_text()


def test_the_second_judge_labels_both_sets(xs_run, tiny_folder, tmp_path):
    run = tmp_path / "j"
    shutil.copytree(xs_run, run)
    args = ["run", "--model", str(tiny_folder), "--out", str(run), *LOOSE, "--overrefusal-n", "10"]
    assert main([*args, "--judge", "self"]) == 0
    ev = json.loads((run / "eval.json").read_text())
    block = ev["overrefusal"]
    assert block["judge"] == "self"
    for name, s in block["sets"].items():
        for c, v in s["conditions"].items():
            src = "ablation" if c == "ortho" else c
            assert v["judge_refusal_rate"] == ev["judge"]["conditions"][f"{name}/{src}"]["refusal_rate"]
    assert "judge self" in (run / "report.html").read_text()


def test_regenerated_ortho_generates_both_sets(xs_run, tiny_folder, tmp_path):
    run = tmp_path / "o"
    shutil.copytree(xs_run, run)
    toml = tmp_path / "run.toml"
    toml.write_text("regenerate_ortho = true\noverrefusal_n = 10\n")
    args = ["run", "--model", str(tiny_folder), "--out", str(run), *LOOSE, "--config", str(toml)]
    assert main([*args, "--judge", "strmatch"]) == 0
    ev = json.loads((run / "eval.json").read_text())
    block = ev["overrefusal"]
    counts = Counter((r["split"], r["condition"]) for r in _rows(run))
    labelled = ev["judge"]["conditions"]
    assert "harmful/ortho" in labelled  # the second judge also labels the rows generated after it ran
    for name, s in block["sets"].items():
        ortho = s["conditions"]["ortho"]
        assert "from" not in ortho and ortho["n"] == 10 and counts[(name, "ortho")] == 10
        assert ortho["judge_refusal_rate"] == labelled[f"{name}/ortho"]["refusal_rate"] is not None
