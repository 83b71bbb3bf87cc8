"""The over-refusal table (XSTest) that the report and the audit page both show, built once.

Rows are the conditions, columns each set's refusal rate: on XSTest's safe prompts a refusal is an
over-refusal; on its unsafe contrasts a refusal is what a safe model should do. Torch-free: the audit
page and the report read ``eval.json["overrefusal"]`` only.
"""

from __future__ import annotations

import html
from typing import Any

ROWS = (("baseline", "baseline"), ("ablation", "ablation"), ("ortho", "ortho"), ("actadd+", "+r"))
SET_NAMES = {"xstest-safe": "safe prompts refused (over-refusal)", "xstest-unsafe": "unsafe prompts refused"}
ATTRIBUTION = (
    "Prompts: XSTest, Röttger et al., “XSTest: A Test Suite for Identifying Exaggerated Safety Behaviours "
    "in Large Language Models”, NAACL 2024; CC-BY-4.0 (refdir/datasets/NOTICE.md)."
)


def overrefusal_table(block: dict[str, Any]) -> tuple[list[str], list[list[Any]], str]:
    """Headers, rows (rates as floats, None where not measured) and the note under the table: n per set,
    how the prompts were chosen, ortho's source when it took ablation's rates, and the attribution."""
    sets = block["sets"]
    judged = bool(block.get("judge"))
    heads = ["condition"]
    for name in sets:
        heads.append(f"{SET_NAMES.get(name, name)}, substring")
        if judged:
            heads.append(f"{SET_NAMES.get(name, name)}, judge {block['judge']}")
    rows = []
    for cond, label in ROWS:
        if not any(cond in s["conditions"] for s in sets.values()):
            continue
        row: list[Any] = [label]
        for s in sets.values():
            v = s["conditions"].get(cond) or {}
            row.append(v.get("refusal_rate"))
            if judged:
                row.append(v.get("judge_refusal_rate"))
        rows.append(row)
    ns = ", ".join(f"{name} n={s['n']}" for name, s in sets.items())
    froms = {
        v["from"] for s in sets.values() for c, v in s["conditions"].items() if c == "ortho" and "from" in v
    }
    ortho = f" ortho: the rates of {', '.join(sorted(froms))}." if froms else ""
    note = f"{ns}; {block.get('selection', '')}.{ortho} {ATTRIBUTION}"
    return heads, rows, note


def overrefusal_html(block: dict[str, Any], table) -> str:
    """The section: heading, the table drawn by ``table(headers, rows)`` (each page's own cell format) and
    the note."""
    heads, rows, note = overrefusal_table(block)
    return f"<h2>Over-refusal (XSTest)</h2>{table(heads, rows)}<p class=note>{html.escape(note)}</p>"
