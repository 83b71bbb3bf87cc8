import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refdir.core.errors import RefdirError
from refdir.method.data import load_builtin, load_prompts, parse_prompts, split_prompts


def test_builtin_sets_are_large_enough_and_categorised():
    for name in ("harmful", "harmless"):
        ps = load_builtin(name)
        assert len(ps) >= 128 + 32 + 100
        assert all(p.category for p in ps)
        assert len({p.category for p in ps}) >= 8


@pytest.mark.parametrize(
    "name,text",
    [
        ("a.json", json.dumps(["x", {"instruction": "y", "category": "c"}])),
        ("a.jsonl", '{"instruction": "x"}\n\n{"instruction": "y"}\n'),
        ("a.csv", "instruction,category\nx,c1\ny,c2\n"),
        ("a.txt", "x\n\ny\n"),
    ],
)
def test_loaders(tmp_path, name, text):
    f = tmp_path / name
    f.write_text(text)
    assert [p.instruction for p in load_prompts(str(f))] == ["x", "y"]


@pytest.mark.parametrize(
    "name,text,msg",
    [
        ("e.json", "[]", "empty"),
        ("m.json", '[\n"a",\n', "line"),
        ("m.jsonl", '{"instruction": "a"}\n{oops\n', "line 2"),
        ("d.txt", "a\nb\na\n", "duplicates"),
        ("b.json", '["a", "  "]', "blank"),
        ("c.csv", "text\na\n", "column"),
        ("u.xml", "<a/>", "unsupported"),
    ],
)
def test_bad_datasets(tmp_path, name, text, msg):
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(RefdirError, match=msg):
        load_prompts(str(f))


def test_missing_dataset():
    with pytest.raises(RefdirError, match="not found"):
        load_prompts("/nonexistent/x.json")


def test_splits_are_seeded_disjoint_and_checked():
    ps = load_builtin("harmful")
    a1, b1 = split_prompts(ps, [10, 5], seed=3)
    a2, b2 = split_prompts(ps, [10, 5], seed=3)
    assert a1 == a2 and b1 == b2
    assert not {p.instruction for p in a1} & {p.instruction for p in b1}
    with pytest.raises(RefdirError, match="requested"):
        split_prompts(ps, [1000], seed=0)
    with pytest.raises(RefdirError, match="positive"):
        split_prompts(ps, [0], seed=0)


texts = st.lists(
    st.text(
        alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), min_size=1, max_size=30
    ).filter(lambda s: s.strip()),
    min_size=1,
    max_size=8,
    unique_by=str.strip,
)


@settings(max_examples=60, deadline=None)
@given(texts)
def test_jsonl_and_json_round_trip(items):
    jsonl = "\n".join(json.dumps({"instruction": s}) for s in items)
    assert [p.instruction for p in parse_prompts(jsonl, ".jsonl")] == items
    assert [p.instruction for p in parse_prompts(json.dumps(items), ".json")] == items


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=60))
def test_parsers_never_crash_with_other_errors(text):
    for suffix in (".json", ".jsonl", ".csv", ".txt"):
        try:
            parse_prompts(text, suffix)
        except RefdirError:
            pass


def test_xstest_ships_250_safe_prompts_of_ten_types_and_200_unsafe_contrasts():
    safe, unsafe = load_builtin("xstest-safe"), load_builtin("xstest-unsafe")
    assert (len(safe), len(unsafe)) == (250, 200)
    assert len({p.category for p in safe}) == 10 and len({p.category for p in unsafe}) == 8
    assert all(p.category and p.category.startswith("contrast_") for p in unsafe)
    assert not {p.instruction for p in safe} & {p.instruction for p in unsafe}
    assert [p.instruction for p in load_prompts("builtin:xstest-safe")] == [p.instruction for p in safe]
