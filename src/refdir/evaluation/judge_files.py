"""Completions files a judge reads (``refdir judge --completions``) and the verdict file it writes.

Any model's completions can be judged, not only a run's: XSTest's labelled CSVs as published (columns
id, type, prompt, completion, annotation_1, annotation_2, agreement, final_label) or JSON lines. The
verdict file holds indices, ids and verdicts, never the completions' text: it is small, and it does not
copy possibly harmful text around.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from refdir.core.errors import RefdirError
from refdir.core.io import read_jsonl, write_json
from refdir.evaluation.verdicts import Verdict

__all__ = ["REQUIRED", "check_out_path", "read_completions", "write_judged"]

REQUIRED = ("prompt", "completion")


def read_completions(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a ``.csv`` (header row) or ``.jsonl`` (one object a line) file, in file order, each
    with string ``prompt`` and ``completion`` fields; other fields kept as they are. Every problem is one
    RefdirError naming the file and the row or line."""
    p = Path(path)
    if not p.is_file():
        raise RefdirError(f"completions file not found: {p}")
    ext = p.suffix.lower()
    if ext not in (".csv", ".jsonl"):
        raise RefdirError(f"{p}: unknown completions format '{p.suffix}'; use .csv or .jsonl")
    try:
        text = p.read_text(encoding="utf-8-sig")  # utf-8-sig: spreadsheet exports start with a BOM
    except (OSError, UnicodeDecodeError) as e:
        raise RefdirError(f"cannot read completions file {p}: {e}") from None
    rows = csv_rows(p, text) if ext == ".csv" else jsonl_rows(p, text)
    if not rows:
        raise RefdirError(f"{p}: no completions found (the file is empty)")
    return rows


def csv_rows(p: Path, text: str) -> list[dict[str, Any]]:
    """CSV data rows ("row N" counts data rows from 1); a short row lacks its last fields."""
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)  # newlines inside quotes kept
    rows: list[dict[str, Any]] = []
    try:
        for n, row in enumerate(reader, 1):
            row.pop(None, None)  # cells beyond the header: not a field
            check_fields(p, f"row {n}", row)
            rows.append(dict(row))
    except csv.Error as e:
        raise RefdirError(f"{p}: malformed CSV on line {reader.line_num}: {e}") from None
    return rows


def jsonl_rows(p: Path, text: str) -> list[dict[str, Any]]:
    """JSON-lines objects (blank lines skipped; "line N" counts every line from 1)."""
    lines = [n for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    rows = read_jsonl(p)
    for n, row in zip(lines, rows):
        if not isinstance(row, dict):
            raise RefdirError(f"{p}: line {n} is not a JSON object")
        check_fields(p, f"line {n}", row)
    return rows


def check_fields(p: Path, where: str, row: dict[str, Any]) -> None:
    for field in REQUIRED:
        if row.get(field) is None:
            have = ", ".join(k for k in row if row[k] is not None) or "none"
            raise RefdirError(f"{p}: {where} has no '{field}' field (fields: {have})")
        if not isinstance(row[field], str):
            raise RefdirError(f"{p}: {where}: '{field}' is not a string")


def check_out_path(out: str | os.PathLike[str], source: str | os.PathLike[str]) -> None:
    """The verdict file must not replace the completions it judges."""
    if Path(out).resolve() == Path(source).resolve():
        raise RefdirError(f"--out {out} is the completions file itself; choose another --out")


def write_judged(
    out_path: str | os.PathLike[str],
    rows: Sequence[dict[str, Any]],
    verdicts: Sequence[Verdict],
    judge_name: str,
    *,
    source: str | os.PathLike[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write (atomically) and return ``{"judge", "n", "refusal_rate", "items", **extra}``: one item per
    row in input order (index, refusal, score, label and the row's id if it has one), no text.
    ``source``: the completions file, refused as ``out_path``."""
    if source is not None:
        check_out_path(out_path, source)
    if len(rows) != len(verdicts):
        raise ValueError(f"{len(rows)} rows but {len(verdicts)} verdicts")
    items = []
    for i, (row, v) in enumerate(zip(rows, verdicts)):
        item: dict[str, Any] = {"index": i, "refusal": v.refusal, "score": v.score, "label": v.label}
        if "id" in row:
            item["id"] = row["id"]
        items.append(item)
    n = len(items)
    doc = {
        "judge": judge_name,
        "n": n,
        "refusal_rate": sum(v.refusal for v in verdicts) / n if n else 0.0,
        "items": items,
        **(extra or {}),
    }
    write_json(out_path, doc)
    return doc
