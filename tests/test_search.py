"""``run_search`` on a tiny run folder: front.json (trial 0 the paper's, proxy and confirmed fronts), trials
rebuilt from their parameters score what was recorded, and a killed search resumes with the very trials an
unkilled one runs."""

import json
import shutil

import pytest
import torch
from test_cli import LOOSE

from refdir.cli import main
from refdir.core.errors import RefdirError
from refdir.core.runtime import Runtime
from refdir.evaluation.trial_scores import confirm
from refdir.method.directions import load_direction
from refdir.method.weighted import WeightedAblation
from refdir.run.folder import RunFolder
from refdir.run.search import Search, SearchSettings, load_space, pareto, read_trials, run_search, trial_edit

SMALL = dict(batch_trials=4, confirm=2, max_new_tokens=4)


@pytest.fixture(scope="module")
def tiny_search(tiny_folder, tmp_path_factory):
    """A finished tiny run (no search yet) and the runtime of its model."""
    out = tmp_path_factory.mktemp("search") / "r"
    assert main(["run", "--model", str(tiny_folder), "--out", str(out), *LOOSE]) == 0
    return out, Runtime.load(str(tiny_folder))


def _copy(src, dst):
    shutil.copytree(src, dst)
    for name in ("front.json", "search_trials.jsonl"):
        (dst / name).unlink(missing_ok=True)
    return dst


def _search(rt, run, trials: int) -> dict:
    return run_search(rt, run, SearchSettings(trials=trials, **SMALL), progress=False, log=lambda *a: None)


@pytest.fixture(scope="module")
def searched(tiny_search, tmp_path_factory):
    src, rt = tiny_search
    run = _copy(src, tmp_path_factory.mktemp("front") / "r")
    return run, rt, _search(rt, run, 8)


def test_pareto_keeps_the_non_dominated_points():
    pts = {0: (0.5, 0.5), 1: (0.2, 0.9), 2: (0.6, 0.6), 3: (0.9, 0.1), 4: (0.2, 0.9), 5: (0.5, 0.7)}
    # 2 and 5 are dominated by 0; 1 and 4 tie (neither dominates the other); sorted by the first coordinate
    assert sorted(pareto(pts)) == [0, 1, 3, 4]
    assert [pts[k] for k in pareto(pts)] == [(0.2, 0.9), (0.2, 0.9), (0.5, 0.5), (0.9, 0.1)]
    assert pareto({}) == [] and pareto({7: (1.0, 1.0)}) == [7]


def test_front_json(searched):
    run, rt, front = searched
    on_disk = json.loads((run / "front.json").read_text())
    assert on_disk == json.loads(json.dumps(front))
    trials = front["trials"]
    assert [t["number"] for t in trials] == list(range(8))
    assert trials[0]["paper"] is True and trials[0]["params"] == {"paper": True}
    assert not any(t["paper"] for t in trials[1:])
    for t in trials:
        assert set(t["proxy"]) == {"refusal", "kl", "refusal_logodds"}
        assert 0 <= t["proxy"]["refusal"] <= 1 and t["proxy"]["kl"] >= 0
    proxy = {t["number"]: (t["proxy"]["refusal"], t["proxy"]["kl"]) for t in trials}
    assert front["front"] == pareto(proxy)
    assert front["front"]  # and every trial off it is dominated by one on it
    for n, (a, b) in proxy.items():
        if n not in front["front"]:
            assert any(proxy[f][0] <= a and proxy[f][1] <= b for f in front["front"])
    confirmed = {t["number"]: t["confirmed"] for t in trials if t["confirmed"]}
    assert 0 in confirmed and 2 <= len(confirmed) <= 3  # trial 0 and up to 2 of the proxy front
    assert set(confirmed) - {0} <= set(front["front"])
    assert front["confirmed_front"] == pareto({n: (c["refusal"], c["kl"]) for n, c in confirmed.items()})
    n_eval = len(json.loads((run / "prompts.json").read_text())["eval_harmful"])
    assert all(c["n_harmful"] == n_eval and 0 <= c["refusal"] <= 1 for c in confirmed.values())
    assert front["n_layers"] == 4 and front["settings"]["trials"] == 8
    assert front["timing"]["proxy_s"] > 0 and front["timing"]["confirm_s"] > 0
    assert front["timing"]["proxy_trials_per_min"] > 0
    assert read_trials(RunFolder(run).search_trials) == [
        {k: t[k] for k in ("number", "params", "proxy", "seconds")} for t in trials
    ]


def test_trial_edits_rebuild_the_recorded_scores(searched):
    run, rt, front = searched
    direction = load_direction(run)
    paper = trial_edit(run, 0)
    assert paper.to_json() == WeightedAblation.paper(direction.vector.float(), 4).to_json()
    space = load_space(RunFolder(run))
    assert torch.equal(space.paper_direction, direction.vector.float())
    assert space.candidates.shape == (4, 64) and space.harmless_mean.shape == (4, 64)
    search = Search(rt, RunFolder(run), SearchSettings(trials=8, **SMALL), log=lambda *a: None)
    scorer = search.scorer()
    for t in front["trials"]:
        edit = trial_edit(run, t["number"])
        got = scorer.score([edit])[0]
        for key, want in t["proxy"].items():
            assert abs(got[key] - want) < 1e-4, (t["number"], key)
    # confirmation of trial 0, redone alone
    data = search.data
    eh = [r["instruction"] for r in data["eval_harmful"]]
    el = [r["instruction"] for r in data["eval_harmless"]]
    (alone,) = confirm(rt.model, rt.tokenizer, rt.fmt, [paper], eh, el, 4)
    c0 = front["trials"][0]["confirmed"]
    assert abs(alone.kl - c0["kl"]) < 1e-4 and alone.refusal == c0["refusal"]
    with pytest.raises(RefdirError, match=r"no search trial 8 \(trials: 0\.\.7\)"):
        trial_edit(run, 8)


def test_trial_edit_without_a_search(tiny_search):
    with pytest.raises(RefdirError, match="run refdir search"):
        trial_edit(tiny_search[0], 0)


def test_killed_search_resumes_with_the_same_trials(tiny_search, tmp_path):
    src, rt = tiny_search
    whole = _copy(src, tmp_path / "whole")
    cut = _copy(src, tmp_path / "cut")
    a = _search(rt, whole, 12)
    b8 = _search(rt, cut, 8)  # the search is killed after its second batch ...
    b = _search(rt, cut, 12)  # ... and started again with the same settings
    assert len(b8["trials"]) == 8 and len(a["trials"]) == len(b["trials"]) == 12
    for x, y in zip(a["trials"], b["trials"]):
        assert x["number"] == y["number"] and x["params"] == y["params"]
        for key in x["proxy"]:
            assert abs(x["proxy"][key] - y["proxy"][key]) < 1e-6
    assert len({json.dumps(t["params"], sort_keys=True) for t in a["trials"]}) == 12
    assert a["front"] == b["front"]
    # a search already holding its trials scores nothing new
    again = _search(rt, cut, 12)
    assert [t["proxy"] for t in again["trials"]] == [t["proxy"] for t in b["trials"]]


def test_space_knows_the_papers_layer(searched):
    """Without it ``anchors`` is always empty, so run_search never scores them."""
    run = searched[0]
    assert load_space(RunFolder(run)).paper_layer == load_direction(run).layer


def test_resume_keeps_anchors_that_spill_past_the_first_batch(tiny_search, tmp_path, monkeypatch):
    import refdir.run.search as search_module

    def with_layer(folder, norms=("none", "output")):
        space = load_space(folder, norms)
        space.paper_layer = 2  # inside the index range [1.2, 2.7] of 4 layers: 3 anchors
        return space

    monkeypatch.setattr(search_module, "load_space", with_layer)
    src, rt = tiny_search
    settings = dict(SMALL, batch_trials=2, confirm=-1)
    whole, cut = _copy(src, tmp_path / "whole"), _copy(src, tmp_path / "cut")
    a = run_search(rt, whole, SearchSettings(trials=6, **settings), progress=False)
    run_search(rt, cut, SearchSettings(trials=2, **settings), progress=False)
    b = run_search(rt, cut, SearchSettings(trials=6, **settings), progress=False)
    assert [t["params"]["direction_index"] for t in a["trials"][1:4]] == [2.0] * 3  # the anchors
    assert [t["params"] for t in a["trials"]] == [t["params"] for t in b["trials"]]


def test_read_trials_ignores_a_cut_last_line(tmp_path):
    rows = [
        {"number": i, "params": {"x": i}, "proxy": {"refusal": 0.1, "kl": 0.2}, "seconds": 1.0}
        for i in range(3)
    ]
    path = tmp_path / "search_trials.jsonl"
    assert read_trials(path) == []
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(text)
    assert read_trials(path) == rows
    path.write_text(text[:-25])  # killed while writing the third line
    assert read_trials(path) == rows[:2]
    path.write_text(text[: text.index("\n") + 1] + '{"number": 1, "par')
    assert read_trials(path) == rows[:1]


def test_search_resumed_after_a_cut_line_keeps_its_new_trials(tiny_search, tmp_path):
    src, rt = tiny_search
    run = _copy(src, tmp_path / "r")
    _search(rt, run, 4)
    path = RunFolder(run).search_trials
    text = path.read_text()
    path.write_text(text[:-40])  # the kill cut trial 3's line
    assert len(read_trials(path)) == 3
    front = _search(rt, run, 8)
    assert len(front["trials"]) == 8
    assert len(read_trials(path)) == 8  # the cut line was dropped before new trials were appended


def test_bad_settings_raise(tiny_search, tmp_path):
    src, rt = tiny_search
    run = _copy(src, tmp_path / "r")
    with pytest.raises(RefdirError, match="--sampler must be one of tpe, nsga2"):
        run_search(rt, run, SearchSettings(trials=2, sampler="grid"), progress=False)


def test_search_on_fused_experts_keeps_no_norms(tiny_search):
    """Norm-keeping edits have no hook form on fused experts: the search leaves them out (and says so)."""
    from tiny import tiny_model

    src, _ = tiny_search
    model, tok = tiny_model("mixtral")
    said: list[str] = []
    search = Search(Runtime(model, tok), RunFolder(src), SearchSettings(**SMALL), log=said.append)
    assert search.space.norms == ("none",)
    assert len(said) == 1 and "fused experts" in said[0]


def test_confirmation_picks_spread_front_trials_under_the_cap(tiny_search):
    src, rt = tiny_search
    search = Search(rt, RunFolder(src), SearchSettings(confirm=2, **{k: SMALL[k] for k in ("batch_trials",)}))
    pts = [(0.5, 0.5), (0.1, 0.9), (0.2, 0.6), (0.3, 0.4), (0.9, 0.05), (0.6, 0.6)]
    search.done = [{"number": i, "proxy": {"refusal": r, "kl": k}} for i, (r, k) in enumerate(pts)]
    assert search.to_confirm({}) == [0, 1, 4]  # front (by refusal) 1, 2, 3, 0, 4 -> spread: first and last
    assert search.to_confirm({0: {}, 1: {}}) == [4]
    search.s.confirm_max_refusal = 0.25
    assert search.to_confirm({}) == [0, 1, 2]
