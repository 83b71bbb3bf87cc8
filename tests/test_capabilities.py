"""Capability benchmarks through lm-evaluation-harness on tiny models and a few-item local data dir."""

import csv
import json
import math
import sys

import pytest
import torch

from refdir.cli import main
from refdir.evaluation.capabilities import mean_stderr, paired_delta, parse_tasks, write_local_tasks
from refdir.method.directions import Direction

pytest.importorskip("lm_eval")

TASKS = "arc_challenge,truthfulqa_mc2,winogrande,mmlu"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A few made-up items per benchmark in the original files' formats (the layout of shared/benchmarks/)."""
    d = tmp_path_factory.mktemp("bench")

    def jsonl(rel, rows):
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text("".join(json.dumps(r) + "\n" for r in rows))

    arc = [
        {
            "id": f"q{i}",
            "question": {
                "stem": f"Which number is {i}?",
                "choices": [
                    {"text": str(i), "label": "A"},
                    {"text": str(i + 1), "label": "B"},
                    {"text": str(i + 2), "label": "C"},
                ],
            },
            "answerKey": "ABC"[i % 3],
        }
        for i in range(5)
    ]
    for split in ("Test", "Train", "Dev"):
        jsonl(f"arc_challenge/ARC-Challenge-{split}.jsonl", arc)
    jsonl(
        "truthfulqa/truthfulqa_mc_v0.hf.jsonl",
        [
            {
                "question": f"What colour is item {i}?",
                "mc1_targets": {"choices": ["Blue.", "Red.", "Green."], "labels": [1, 0, 0]},
                "mc2_targets": {
                    "choices": ["Blue.", "It is blue.", "Red.", "Green."],
                    "labels": [1, 1, 0, 0],
                },
            }
            for i in range(4)
        ],
    )
    wino = [
        {
            "qID": f"w{i}",
            "sentence": f"Sarah helped Maria because _ was kind {i}.",
            "option1": "Sarah",
            "option2": "Maria",
            "answer": str(1 + i % 2),
        }
        for i in range(4)
    ]
    jsonl("winogrande/dev.jsonl", wino)
    jsonl("winogrande/train_l.jsonl", wino)
    for split in ("test", "dev"):
        (d / f"mmlu/data/{split}").mkdir(parents=True, exist_ok=True)
        for subject in ("anatomy", "astronomy"):
            with open(d / f"mmlu/data/{split}/{subject}_{split}.csv", "w", newline="") as f:
                w = csv.writer(f)
                for i in range(3):
                    w.writerow([f"Question {i} about {subject}?", "one", "two", "None", "four", "ABCD"[i]])
    return d


@pytest.fixture(scope="module")
def tiny_direction(tiny_folder, tmp_path_factory):
    d = tmp_path_factory.mktemp("dir")
    r = 4 * torch.randn(64, generator=torch.Generator().manual_seed(3))
    Direction(r, 1, -1, "").save(d / "direction")
    return d


def test_paired_delta_matches_a_hand_computation():
    b, t = [0, 0, 1, 1], [1, 0, 1, 1]  # differences 1, 0, 0, 0: mean 0.25, sd 0.5, se 0.25
    p = paired_delta(b, t)
    assert p["delta"] == pytest.approx(0.25)
    assert p["delta_stderr"] == pytest.approx(0.25)
    assert p["delta_ci95"] == pytest.approx([0.25 - 1.959964 * 0.25, 0.25 + 1.959964 * 0.25])
    assert mean_stderr([1, 0, 1, 1, 0]) == pytest.approx(math.sqrt(0.3 / 5))  # sample sd² 0.3
    # agreeing conditions: the paired interval is far narrower than the unpaired one
    b = [1, 0] * 50
    t = b[:-2] + [0, 0]
    paired = paired_delta(b, t)["delta_stderr"]
    assert paired < 0.25 * math.hypot(mean_stderr(b), mean_stderr(t))
    with pytest.raises(ValueError):
        paired_delta([1, 0], [1])


def test_mcnemar_exact_matches_the_binomial_by_hand():
    """4 items lost and none gained: the normal paired interval excludes 0, the exact test does not."""
    b, t = [1] * 4 + [1, 0] * 55, [0] * 4 + [1, 0] * 55  # 114 items, 4 lost, 0 gained
    p = paired_delta(b, t)
    assert (p["lost"], p["gained"]) == (4, 0)
    assert p["delta_ci95"][1] < 0  # the normal form calls it resolved ...
    assert p["mcnemar_p"] == pytest.approx(2 * 0.5**4)  # ... a fair coin gives 4-0 one time in 8
    # 7 lost, 1 gained: 2 * P(X <= 1), X ~ Bin(8, 1/2) = 2 * 9/256
    assert paired_delta([1] * 7 + [0], [0] * 7 + [1])["mcnemar_p"] == pytest.approx(18 / 256)
    assert paired_delta([1, 0], [1, 0])["mcnemar_p"] == 1.0  # nothing changed
    assert "mcnemar_p" not in paired_delta([0.3, 0.5], [0.4, 0.5])  # mc2 scores are not right/wrong


def test_results_round_trip_and_table_3_row():
    """results.py: per-item scores survive their JSON; one lost item of four is Δ −25 ± 49.0 points."""
    from refdir.evaluation.capabilities import (
        TaskScores,
        compare,
        scores_from_json,
        scores_to_json,
        table_rows,
    )

    base = {"mmlu": TaskScores("mmlu", "acc", [1.0, 1.0, 0.0, 1.0], 10.0)}
    treated = {"mmlu": TaskScores("mmlu", "acc", [1.0, 0.0, 0.0, 1.0], 12.0)}
    assert scores_from_json(scores_to_json(base)) == base
    (row,) = compare(base, treated)
    assert row["delta"] == pytest.approx(-0.25, abs=1e-12)
    assert row["delta_stderr"] == pytest.approx(0.25, abs=1e-12)  # sd 0.5 of the differences / sqrt(4)
    assert (row["lost"], row["gained"], row["mcnemar_p"]) == (1, 0, 1.0)
    assert table_rows({"results": [row]}) == [
        ("mmlu", "4", "50.0", "75.0 (-25.0 ± 49.0; 1 lost, 0 gained, exact p 1)")
    ]


def test_parse_tasks_expands_paper():
    assert parse_tasks("paper") == [
        "mmlu",
        "arc_challenge",
        "gsm8k",
        "truthfulqa_mc2",
        "winogrande",
        "hellaswag",
    ]
    assert parse_tasks("mmlu, gsm8k,mmlu") == ["mmlu", "gsm8k"]


def test_local_task_yamls_reuse_the_harness_definitions(data_dir, tmp_path):
    names = write_local_tasks(data_dir, tmp_path, ["arc_challenge", "mmlu"])
    assert names == {"arc_challenge": "refdir_arc_challenge", "mmlu": "refdir_mmlu"}
    arc = (tmp_path / "refdir_arc_challenge.yaml").read_text()
    assert "lm_eval/tasks/arc/arc_challenge.yaml" in arc and str(data_dir.resolve()) in arc
    assert sorted(p.name for p in tmp_path.glob("refdir_mmlu_*.yaml")) == [
        "refdir_mmlu_anatomy.yaml",
        "refdir_mmlu_astronomy.yaml",
    ]


def test_both_conditions_and_the_exported_checkpoint_agree(tiny_folder, tiny_direction, data_dir, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    common = ["--tasks", TASKS, "--data-dir", str(data_dir), "--limit", "4"]
    assert (
        main(
            [
                "capabilities",
                "--model",
                str(tiny_folder),
                "--direction",
                str(tiny_direction),
                *common,
                "--out",
                str(a),
            ]
        )
        == 0
    )
    res = json.loads(a.read_text())
    rows = {r["task"]: r for r in res["results"]}
    assert set(rows) == {"arc_challenge", "truthfulqa_mc2", "winogrande", "mmlu"}
    assert [rows[t]["n"] for t in ("arc_challenge", "truthfulqa_mc2", "winogrande", "mmlu")] == [4, 4, 4, 4]
    for r in rows.values():  # the summary numbers are the per-item numbers
        items = res["per_item"][r["task"]]
        assert r["baseline"] == pytest.approx(sum(items["baseline"]) / r["n"])
        assert r["delta"] == pytest.approx(r["orthogonalized"] - r["baseline"])
        assert r["delta_ci95"][0] <= r["delta"] <= r["delta_ci95"][1]
    mc2 = res["per_item"]["truthfulqa_mc2"]
    # the edit is real (the tiny model's mc2 mass is ~1e-9: compare relatively)
    assert (
        max(abs(x - y) / max(abs(x), abs(y)) for x, y in zip(mc2["baseline"], mc2["orthogonalized"])) > 1e-2
    )

    assert (
        main(
            [
                "export",
                "--model",
                str(tiny_folder),
                "--direction",
                str(tiny_direction),
                "--out",
                str(tmp_path / "exp"),
            ]
        )
        == 0
    )
    assert main(["capabilities", "--model", str(tmp_path / "exp"), *common, "--out", str(b)]) == 0
    exported = json.loads(b.read_text())
    assert exported["direction"] is None and "orthogonalized" not in exported["results"][0]
    for task, items in res[
        "per_item"
    ].items():  # the in-place edit scores what the exported checkpoint scores
        assert exported["per_item"][task]["baseline"] == pytest.approx(items["orthogonalized"], rel=1e-4), (
            task
        )


def _fails(capsys, argv, out, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_bad_input_is_one_line_and_writes_nothing(
    tiny_folder, tiny_direction, data_dir, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "o.json"
    base = ["capabilities", "--model", str(tiny_folder), "--out", str(out)]
    _fails(capsys, base + ["--tasks", "no_such_task_xyz"], out, "unknown task 'no_such_task_xyz'")
    _fails(capsys, base + ["--tasks", "gsm8k", "--data-dir", str(data_dir)], out, "lacks gsm8k's files")
    _fails(
        capsys, base + ["--tasks", "arc_challenge", "--data-dir", str(tmp_path / "nope")], out, "not a folder"
    )
    other = tmp_path / "other"
    Direction(torch.randn(32), 1, -1, "").save(other / "direction")
    _fails(
        capsys,
        base + ["--tasks", "arc_challenge", "--data-dir", str(data_dir), "--direction", str(other)],
        out,
        "d_model is 64",
    )
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # not installed
    _fails(capsys, base + ["--tasks", "arc_challenge"], out, "pip install 'refdir[capabilities]'")


def test_run_stage_reports_table_3_and_resumes(tiny_folder, data_dir, tmp_path, capsys):
    from test_cli import LOOSE

    out = tmp_path / "run"
    argv = [
        "run",
        "--model",
        str(tiny_folder),
        "--out",
        str(out),
        *LOOSE,
        "--capabilities",
        "arc_challenge,winogrande",
        "--capabilities-data-dir",
        str(data_dir),
        "--capabilities-limit",
        "3",
    ]
    assert main(argv) == 0
    res = json.loads((out / "capabilities.json").read_text())
    assert [r["task"] for r in res["results"]] == ["arc_challenge", "winogrande"]
    assert all(r["n"] == 3 and "delta_ci95" in r for r in res["results"])
    base = json.loads((out / "capabilities_baseline.json").read_text())["scores"]
    assert base["arc_challenge"]["items"] == res["per_item"]["arc_challenge"]["baseline"]
    html = (out / "report.html").read_text()
    assert "Capability benchmarks" in html and "arc_challenge" in html
    capsys.readouterr()
    assert main(argv) == 0
    assert "capabilities: reused" in capsys.readouterr().err


def _harness_pair(family: str):
    """refdir's harness model and the harness's own HFLM over the same tiny model."""
    from lm_eval.models.huggingface import HFLM
    from tiny import tiny_model

    from refdir.evaluation.capabilities.harness import harness_lm

    model, tok = tiny_model(family)
    ours = harness_lm(HFLM, model, tok, rows=3, gen_rows=2)
    theirs = HFLM(pretrained=model, tokenizer=tok, batch_size=3)
    return ours, theirs


@pytest.mark.parametrize("family", ["qwen2", "gemma3", "mixtral"])
def test_loglikelihoods_equal_the_harness_loop(family):
    """Shared prefixes, duplicate rows, left cuts at max_length: the same (log p, is_greedy) as HFLM's."""
    ours, theirs = _harness_pair(family)
    g = torch.Generator().manual_seed(0)
    shot = torch.randint(3, 90, (20,), generator=g).tolist()  # a few-shot context shared by several requests
    reqs = []
    for i in range(9):
        ctx = shot + torch.randint(3, 90, (1 + i % 4,), generator=g).tolist()
        cont = torch.randint(3, 90, (1 + i % 3,), generator=g).tolist()
        reqs.append((None, ctx, cont))
    with torch.no_grad():  # one continuation is the model's own argmax, so is_greedy is True somewhere
        ctx = reqs[4][1]
        top = theirs.model(torch.tensor([ctx], device=theirs.model.device)).logits[0, -1].argmax().item()
    reqs.append((None, ctx, [top]))
    reqs.append(reqs[2])  # the same request twice (MMLU's choices share a context; a repeat must not break)
    reqs.append((None, torch.randint(3, 90, (40,), generator=g).tolist(), [5, 6]))
    theirs._max_length = ours._max_length = 30  # the last request is cut on the left, as the harness cuts it
    got = ours._loglikelihood_tokens(reqs, disable_tqdm=True)
    want = type(theirs)._loglikelihood_tokens(theirs, reqs, disable_tqdm=True)
    assert [b for _, b in got] == [b for _, b in want]
    assert max(abs(a - b) for (a, _), (b, _) in zip(got, want)) < 1e-4
    assert any(b for _, b in want) and len({round(a, 3) for a, _ in want}) > 5  # not a degenerate case


def test_greedy_generate_until_equals_the_harness_loop():
    """Stop strings, per-request budgets, groups of gen_kwargs: the same strings as HFLM.generate_until."""
    from types import SimpleNamespace

    ours, theirs = _harness_pair("qwen2")
    texts = ["Question: what is one plus one?\nAnswer:", "Hello there", "a b c d e f", "Tell me about x."]
    kw_a = {"until": ["\n\n", "e"], "do_sample": False, "max_gen_toks": 12}
    kw_b = {"until": ["Question:"], "do_sample": False, "temperature": 0.0, "max_gen_toks": 6}
    reqs = [SimpleNamespace(args=(t, kw)) for kw in (kw_a, kw_b) for t in texts]
    got = ours.generate_until(reqs, disable_tqdm=True)
    want = theirs.generate_until(reqs, disable_tqdm=True)
    assert got == want
    assert len(set(want)) > 3 and any(w for w in want)  # not all empty


def test_benchmark_merge_joins_invocations_and_keeps_each_tasks_limit():
    """benchmarks/capabilities.py: per-task limits run as separate invocations whose JSONs join into one
    table (results, per-item scores, each task's limit); JSONs of another direction are refused."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "capabilities.py"
    spec = importlib.util.spec_from_file_location("bench_capabilities", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.limit_groups(["mmlu", "gsm8k", "winogrande"], 100, ["gsm8k=20"]) == {
        100: ["mmlu", "winogrande"],
        20: ["gsm8k"],
    }
    with pytest.raises(SystemExit):
        bench.limit_groups(["mmlu"], 100, ["arc=5"])

    def part(task, limit, score, layer=3):
        return {
            "model": "m",
            "direction": {"layer": layer, "pos": -1},
            "wall_seconds": 10.0,
            "settings": {"tasks": [task], "limit": limit},
            "results": [{"task": task, "n": limit, "baseline": score}],
            "per_item": {task: {"baseline": [score] * limit}},
        }

    got = bench.merge([part("mmlu", 4, 0.5), part("gsm8k", 2, 0.25)])
    assert got["settings"]["tasks"] == ["mmlu", "gsm8k"]
    assert got["settings"]["limit"] == {"mmlu": 4, "gsm8k": 2}
    assert [r["task"] for r in got["results"]] == ["mmlu", "gsm8k"]
    assert got["per_item"]["gsm8k"]["baseline"] == [0.25, 0.25] and got["wall_seconds"] == 20.0
    with pytest.raises(SystemExit):
        bench.merge([part("mmlu", 4, 0.5), part("gsm8k", 2, 0.25, layer=5)])
