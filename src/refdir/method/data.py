"""Instruction sets: built-in harmful/harmless prompts, loaders for user files, seeded splits.

A prompt set is a list of :class:`Prompt` (instruction + optional category). Sources are
``builtin:harmful`` / ``builtin:harmless``, a ``.json`` / ``.jsonl`` / ``.csv`` / ``.txt`` file, or a
Hugging Face dataset name (needs internet). Every loader rejects empty, blank and duplicate
prompts with a one-line message naming the file and line.
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from refdir.core.errors import RefdirError

BUILTIN = (
    "builtin:harmful",
    "builtin:harmless",
    "builtin:harmless_pairs",
    "builtin:pseudo-harmful",  # safe prompts that sound unsafe: false-refusal training (overrefusal)
    "builtin:xstest-safe",
    "builtin:xstest-unsafe",
)
# XSTest (Röttger et al., NAACL 2024; CC-BY-4.0, datasets/NOTICE.md): one file, split by its label
XSTEST_LABELS = {"xstest-safe": "safe", "xstest-unsafe": "unsafe"}


@dataclass(frozen=True)
class Prompt:
    instruction: str
    category: str | None = None

    def to_json(self) -> dict[str, str | None]:
        return asdict(self)


def _from_obj(obj: object, where: str, field: str) -> Prompt:
    if isinstance(obj, str):
        return Prompt(obj)
    if isinstance(obj, dict):
        text = obj.get(field)
        if not isinstance(text, str):
            raise RefdirError(
                f"{where}: object has no string field '{field}' (use --field to name the column)"
            )
        cat = obj.get("category")
        return Prompt(text, None if cat is None else str(cat))
    raise RefdirError(f"{where}: expected a string or an object with '{field}', got {type(obj).__name__}")


def _parse_json(text: str, name: str, field: str) -> list[Prompt]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise RefdirError(f"{name}: malformed JSON at line {e.lineno}: {e.msg}") from None
    if isinstance(data, dict):  # {"instructions": [...]} or {"data": [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise RefdirError(f"{name}: expected a JSON list of prompts")
        data = lists[0]
    if not isinstance(data, list):
        raise RefdirError(f"{name}: expected a JSON list of prompts")
    return [_from_obj(o, f"{name} item {i + 1}", field) for i, o in enumerate(data)]


def _parse_jsonl(text: str, name: str, field: str) -> list[Prompt]:
    out: list[Prompt] = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise RefdirError(f"{name}: malformed JSON on line {i}: {e.msg}") from None
        out.append(_from_obj(obj, f"{name} line {i}", field))
    return out


def _parse_csv(text: str, name: str, field: str) -> list[Prompt]:
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    out: list[Prompt] = []
    try:
        if not reader.fieldnames or field not in reader.fieldnames:
            raise RefdirError(
                f"{name}: no column '{field}' (columns: {', '.join(reader.fieldnames or [])}); "
                "use --field to name the instruction column"
            )
        for row in reader:
            if row.get(field) is None:
                raise RefdirError(f"{name}: malformed CSV on line {reader.line_num}: missing '{field}' value")
            out.append(Prompt(row[field], row.get("category") or None))
    except csv.Error as e:
        raise RefdirError(f"{name}: malformed CSV on line {reader.line_num}: {e}") from None
    return out


def _parse_txt(text: str, name: str, field: str) -> list[Prompt]:
    return [Prompt(line.strip()) for line in text.splitlines() if line.strip()]


PARSERS = {".json": _parse_json, ".jsonl": _parse_jsonl, ".csv": _parse_csv, ".txt": _parse_txt}


def validate(prompts: list[Prompt], name: str) -> list[Prompt]:
    """Reject empty sets, blank and duplicate prompts: they silently bias mean activations."""
    if not prompts:
        raise RefdirError(f"{name}: no prompts found (the dataset is empty)")
    seen: dict[str, int] = {}
    for i, p in enumerate(prompts, 1):
        if not p.instruction.strip():
            raise RefdirError(f"{name}: prompt {i} is blank; remove it")
        key = p.instruction.strip()
        if key in seen:
            raise RefdirError(f"{name}: prompt {i} duplicates prompt {seen[key]}; remove duplicates")
        seen[key] = i
    return prompts


def parse_prompts(text: str, suffix: str, name: str = "dataset", field: str = "instruction") -> list[Prompt]:
    """Parse prompt-set text in the format named by ``suffix`` and validate it."""
    parser = PARSERS.get(suffix.lower())
    if parser is None:
        raise RefdirError(f"{name}: unsupported file type '{suffix}' (use .json, .jsonl, .csv or .txt)")
    return validate(parser(text, name, field), name)


def load_builtin(which: str, field: str = "instruction") -> list[Prompt]:
    """The prompt sets shipped with refdir (280 harmful and 280 harmless instructions, and 32 harmless
    instruction + response pairs, written for this project with categories; XSTest's 250 safe and 200
    unsafe contrast prompts, category = XSTest type, to measure over-refusal)."""
    label = XSTEST_LABELS.get(which)
    # one joinpath step at a time: Traversable.joinpath takes a single segment before Python 3.11
    file = "xstest" if label else which
    file = file.replace("-", "_")  # builtin:pseudo-harmful is pseudo_harmful.json
    text = resources.files("refdir").joinpath("datasets").joinpath(f"{file}.json").read_text(encoding="utf-8")
    if label:  # keep the rows of one label
        text = json.dumps([r for r in json.loads(text) if r["label"] == label])
    return parse_prompts(text, ".json", f"builtin:{which}", field)


def load_prompts(source: str, field: str = "instruction", split: str = "train") -> list[Prompt]:
    """Load a prompt set from ``builtin:NAME``, a local file, or a Hugging Face dataset name."""
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if f"builtin:{name}" not in BUILTIN:
            raise RefdirError(f"unknown built-in set '{source}' (use {' or '.join(BUILTIN)})")
        return load_builtin(name, field)
    path = Path(source).expanduser()
    if path.exists() or path.suffix.lower() in PARSERS:
        if not path.is_file():
            raise RefdirError(f"dataset not found: {source}")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise RefdirError(f"cannot read dataset {source}: {e}") from None
        return parse_prompts(text, path.suffix, str(source), field)
    return _load_hf(source, field, split)


def load_text_pairs(source: str) -> list[tuple[str, str]]:
    """Instruction + response pairs: harmless *text* for the cross-entropy check (paper Table 7).

    Each item needs ``instruction`` and ``response`` (or Alpaca's ``output``).
    """
    try:
        responses = load_prompts(source, "response")
    except RefdirError as e:
        if "no string field" not in str(e):
            raise
        responses = load_prompts(source, "output")
    instructions = load_prompts(source, "instruction")
    return [(i.instruction, r.instruction) for i, r in zip(instructions, responses)]


def _load_hf(name: str, field: str, split: str) -> list[Prompt]:
    """A Hugging Face dataset by name (``owner/name``); users with internet only."""
    try:
        import datasets
    except ImportError:
        raise RefdirError(
            f"dataset not found: {name} (not a file; for hub datasets pip install datasets)"
        ) from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:
        raise RefdirError(f"cannot load hub dataset {name}: {str(e).splitlines()[0][:200]}") from None
    return validate([_from_obj(dict(r), f"{name} row {i}", field) for i, r in enumerate(ds)], name)


def split_prompts(
    prompts: list[Prompt], sizes: list[int], seed: int, name: str = "dataset"
) -> list[list[Prompt]]:
    """Disjoint seeded samples of the given sizes; clear error when there are too few prompts."""
    if any(s <= 0 for s in sizes):
        raise RefdirError(f"sizes must be positive, got {sizes}")
    if sum(sizes) > len(prompts):
        raise RefdirError(
            f"{name}: has {len(prompts)} prompts but {sum(sizes)} were requested "
            f"({' + '.join(map(str, sizes))}); lower the sizes or add prompts"
        )
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    out: list[list[Prompt]] = []
    start = 0
    for s in sizes:
        out.append([prompts[i] for i in order[start : start + s]])
        start += s
    return out


def pool_after(prompts: list[Prompt], used: list[list[Prompt]]) -> list[Prompt]:
    """Prompts not in any of ``used``, in a stable order: the refill pool for filtering."""
    taken = {p.instruction for group in used for p in group}
    return [p for p in prompts if p.instruction not in taken]
