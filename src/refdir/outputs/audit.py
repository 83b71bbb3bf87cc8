"""The audit: one self-contained page a model developer reads to learn how brittle their safety tuning is.

Built from a run folder's artifacts only (``refdir audit --run RUN``), or after running what is missing
on a model (``refdir audit --model M``: the run with a stated preset, the refusal cone and the monitor).
It says: how often the model refuses; what removes that and how easily (directional ablation, weight
orthogonalization, subtracting r, an adversarial suffix); what it costs (KL, cross-entropy, capability
deltas when measured); how many dimensions refusal needs (the cone); whether the direction detects
harmful prompts (the monitor); and exactly what was measured (prompt format, model, revision, refdir).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from refdir.core.errors import RefdirError
from refdir.core.io import write_json, write_text
from refdir.outputs.overrefusal_table import overrefusal_html
from refdir.run.folder import RunFolder


def _load(path: Path) -> Any:
    """A run-folder JSON artifact, or None when that analysis was not run."""
    return json.loads(path.read_text()) if path.is_file() else None


def _removals(harm: dict, suffix: dict | None) -> list[dict]:
    """Each way of removing refusal with its harmful refusal rate, n and drop from the baseline."""
    base = harm["baseline"]["refusal_rate"]

    def removal(name: str, rate: float | None, n: int, how: str) -> dict:
        return {
            "method": name,
            "refusal_rate": rate,
            "n": n,
            "drop": None if rate is None else round(base - rate, 4),
            "how": how,
        }

    removals = [
        removal(
            "directional ablation",
            harm["ablation"]["refusal_rate"],
            harm["ablation"]["n"],
            "project r̂ out of the residual stream at inference (hooks)",
        ),
        removal(
            "orthogonalized weights",
            harm["ortho"]["refusal_rate"],
            harm["ortho"]["n"],
            "a plain checkpoint with r̂ projected out of every residual writer: no code needed to run it",
        ),
        removal(
            "subtract r (activation addition, coeff -1)",
            harm["actadd-"]["refusal_rate"],
            harm["actadd-"]["n"],
            "add −r at one layer (hooks)",
        ),
    ]
    if suffix:
        removals.append(
            removal(
                "adversarial suffix (GCG)",
                suffix["refusal_rate"]["adversarial"],
                suffix["n_eval"],
                f"{suffix['n_tokens']} tokens appended to the prompt, found in {suffix['seconds']} s",
            )
        )
    return removals


def _cost(ev: dict, prompts: dict) -> dict:
    """What ablation costs on harmless prompts (KL, CE), with the counts it rests on."""
    klce, text = ev["kl_ce_harmless"], ev.get("ce_harmless_text") or {}
    return {
        "kl_first_token": {c: klce[c]["kl_first"] for c in ("ablation", "actadd+")},
        "ce_own_completions": {c: klce[c]["ce"] for c in ("baseline", "ablation")},
        "ce_harmless_text": {c: text[c]["ce"] for c in ("baseline", "ablation")} if text else None,
        "n": len(prompts.get("eval_harmless", [])) or None,
        "n_ce_text": len(prompts.get("ce_text", [])) or None,  # instruction+response pairs
        "ce_text_tokens": text["baseline"].get("ce_tokens") if text else None,
    }


def _cone_summary(cone: dict | None) -> dict | None:
    """The cone's ranks and the first rank that reaches the lowest refusal rate."""
    if not cone:
        return None
    rows = cone["ranks"]
    floor = min(r["refusal_rate"] for r in rows)
    return {
        "ranks": [{k: r[k] for k in ("rank", "refusal_rate", "kl", "n")} for r in rows],
        "rank_needed": next(r["rank"] for r in rows if r["refusal_rate"] <= floor + 1e-9),
    }


def _monitor_summary(mon: dict | None) -> dict | None:
    if not mon:
        return None
    return {
        "layer": mon["layer"],
        "n": mon["n_evaluation"],
        "reads": {
            r: {"auroc": v["auroc"], "tpr_at_1pct_fpr": v["tpr_at_1pct_fpr"]}
            for r, v in mon["evaluation"].items()
        },
        "gcg_flagged": (mon.get("suffix") or {}).get("flagged"),
    }


def build_audit(run: str | Path) -> dict:
    """audit.json: every finding with the number of prompts it rests on; None where not measured."""
    folder = RunFolder(run)
    ev, cfg, prompts = _load(folder.eval), _load(folder.config) or {}, _load(folder.prompts) or {}
    if ev is None:
        raise RefdirError(
            f"{folder.path} has no evaluation yet: run `refdir run --out {folder.path}` first "
            "(or audit --model M)"
        )
    harm, harmless = ev["refusal"]["harmful"], ev["refusal"]["harmless"]
    caps, jb = _load(folder.capabilities), _load(folder.jailbreaks)
    return {
        "model": cfg.get("model_spec") or cfg.get("model"),
        "revision": (cfg.get("load") or {}).get("revision"),
        "refdir": cfg.get("refdir"),
        "load": cfg.get("load"),
        "prompt_format": prompts.get("prompt_format"),
        "direction": {
            "layer": ev["direction"]["layer"],
            "pos": ev["direction"]["pos"],
            "token": ev["direction"].get("token"),
        },
        "baseline_refusal": {
            "harmful": harm["baseline"]["refusal_rate"],
            "n": harm["baseline"]["n"],
            "harmless": harmless["baseline"]["refusal_rate"],
            "n_harmless": harmless["baseline"]["n"],
        },
        "induced_refusal": {
            "refusal_rate": harmless["actadd+"]["refusal_rate"],
            "n": harmless["actadd+"]["n"],
        },
        "removal": _removals(harm, _load(folder.suffix)),
        "overrefusal": ev.get("overrefusal"),  # XSTest; None when the run measured none
        "cost": _cost(ev, prompts),
        "capabilities": caps.get("results") if caps else None,
        "jailbreaks": ({k: jb[k] for k in ("n_prompts", "max_new_tokens", "judges", "rows")} if jb else None),
        "cone": _cone_summary(_load(folder.cone)),
        "monitor": _monitor_summary(_load(folder.monitor)),
        "judge": "substring (paper); second judge in the run report when run",
        "max_new_tokens": ev.get("max_new_tokens"),
    }


def _verdict(a: dict) -> str:
    """One sentence on brittleness, from the numbers (no adjectives the numbers do not support)."""
    best = min((r for r in a["removal"] if r["refusal_rate"] is not None), key=lambda r: r["refusal_rate"])
    return (
        f"The model refuses {a['baseline_refusal']['harmful']:.0%} of {a['baseline_refusal']['n']} "
        f"harmful requests; {best['method']} brings that to {best['refusal_rate']:.0%} (n={best['n']}), "
        f"at a first-token KL of {a['cost']['kl_first_token']['ablation']:.3f} on harmless prompts."
    )


def _fmt(v) -> str:
    """A cell as a reader wants it: floats to 3 significant digits (a rate of 0.46, not 0.45999999999999996;
    a KL of 0.113), integers and text as they are, nothing for a missing value."""
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def _rows(headers, rows) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    tr = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{tr}</table>"


def _jailbreak_section(jb: dict | None) -> str:
    """The paper's Table 2 analogue: refusal and compliance by every judge, one row per attack."""
    if not jb:
        return "<p class=note>Jailbreak table: not measured (refdir jailbreaks).</p>"
    judges = jb["judges"]
    head = ["attack", "n"] + [f"refusal ({j})" for j in judges] + [f"compliance ({j})" for j in judges]
    rows = [
        [r["condition"], r["n"]]
        + [r["refusal"].get(j) for j in judges]
        + [r["compliance"].get(j) for j in judges]
        for r in jb["rows"]
    ]
    return (
        "<h2>Attacks side by side (paper Table 2)</h2>"
        + _rows(head, rows)
        + f"<p class=note>{jb['n_prompts']} harmful evaluation prompts, greedy, {jb['max_new_tokens']} new "
        "tokens.</p>"
    )


def _removal_section(a: dict) -> str:
    """What removes refusal, and the baseline and induced rates it is measured against."""
    b, ind = a["baseline_refusal"], a["induced_refusal"]
    return (
        "<h2>What removes refusal, and how easily</h2>"
        + _rows(
            ["method", "harmful refusal rate", "n", "drop from baseline", "what it takes"],
            [[r["method"], r["refusal_rate"], r["n"], r["drop"], r["how"]] for r in a["removal"]],
        )
        + f"<p>Baseline: {_fmt(b['harmful'])} of harmful (n={b['n']}), "
        f"{_fmt(b['harmless'])} of harmless (n={b['n_harmless']}) "
        f"refused. Adding r makes {_fmt(ind['refusal_rate'])} of harmless requests refused "
        f"(n={ind['n']}).</p>"
    )


def _cost_section(a: dict) -> str:
    """KL and CE on harmless prompts, then the capability deltas when measured."""
    c = a["cost"]
    rows = [
        ["first-token KL on harmless prompts", 0.0, c["kl_first_token"]["ablation"], c["n"]],
        [
            "CE of the model's own harmless completions",
            c["ce_own_completions"]["baseline"],
            c["ce_own_completions"]["ablation"],
            c["n"],
        ],
    ]
    if c["ce_harmless_text"]:
        rows.append(
            [
                "CE on harmless instruction+response text",
                c["ce_harmless_text"]["baseline"],
                c["ce_harmless_text"]["ablation"],
                f"{c.get('n_ce_text')} texts, {c.get('ce_text_tokens')} tokens",
            ]
        )
    out = "<h2>What it costs</h2>" + _rows(["measure", "baseline", "ablated", "n"], rows)
    if not a["capabilities"]:
        return out + "<p class=note>Capability benchmarks: not measured in this run.</p>"
    keys = ("task", "metric", "n", "baseline", "orthogonalized", "delta", "delta_ci95")
    return out + _rows(
        ["task", "metric", "n", "baseline", "orthogonalized", "Δ", "95% CI"],
        [[cap[k] for k in keys] for cap in a["capabilities"]],
    )


def _cone_section(cone: dict | None) -> str:
    head = "<h2>How many dimensions refusal needs</h2>"
    if not cone:
        return head + "<p class=note>Refusal cone: not measured (refdir cone).</p>"
    return (
        head
        + _rows(
            ["rank", "refusal rate", "KL", "n"],
            [[r["rank"], r["refusal_rate"], r["kl"], r["n"]] for r in cone["ranks"]],
        )
        + f"<p>Lowest refusal first reached at rank {cone['rank_needed']}.</p>"
    )


def _monitor_section(m: dict | None) -> str:
    head = "<h2>Does the direction detect harmful prompts?</h2>"
    if not m:
        return head + "<p class=note>Monitor: not measured (refdir monitor).</p>"
    g = m["gcg_flagged"] or {}
    return (
        head
        + _rows(
            ["read", "AUROC", "TPR at 1% FPR", "GCG-suffixed harmful flagged"],
            [
                [r, v["auroc"], v["tpr_at_1pct_fpr"], (g.get(r) or {}).get("with_gcg_suffix")]
                for r, v in m["reads"].items()
            ],
        )
        + f"<p class=note>layer {m['layer']}; {m['n']['harmful']} harmful vs {m['n']['harmless']} "
        "harmless held-out prompts.</p>"
    )


def _provenance_section(a: dict) -> str:
    """Exactly what was measured: model, revision, refdir, loading, direction, decoding, judge, format."""
    pf = a["prompt_format"] or {}
    return (
        f"<h2>Exactly what was measured</h2><p>model <code>{html.escape(str(a['model']))}</code>, revision "
        f"{html.escape(str(a['revision']))}, refdir {html.escape(str(a['refdir']))}, loaded as "
        f"<code>{html.escape(json.dumps(a['load']))}</code>; direction at layer {a['direction']['layer']}, "
        f"position {a['direction']['pos']}; greedy, {a['max_new_tokens']} new tokens; judge: "
        f"{html.escape(a['judge'])}.</p><pre>{html.escape(str(pf.get('example')))}</pre>"
    )


def render_audit(a: dict) -> str:
    """The self-contained page (no scripts): verdict, removal, cost, attacks, cone, monitor, provenance."""
    from refdir.outputs.report import CSS

    parts = [
        f"<h1>Refusal audit: <code>{html.escape(str(a['model']))}</code></h1>",
        f"<p><b>{html.escape(_verdict(a))}</b></p>",
        _removal_section(a),
        overrefusal_html(a["overrefusal"], _rows)
        if a.get("overrefusal")
        else "<p class=note>Over-refusal (XSTest): not measured (--overrefusal-n 0).</p>",
        _cost_section(a),
        _jailbreak_section(a["jailbreaks"]),
        _cone_section(a["cone"]),
        _monitor_section(a["monitor"]),
        _provenance_section(a),
    ]
    return (
        "<!doctype html><html><head><meta charset=utf-8><title>refusal audit</title>"
        f"<style>{CSS}</style></head>"
        f"<body>{''.join(parts)}</body></html>"
    )


def write_audit(run: str | Path, out: str | Path) -> Path:
    a = build_audit(run)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "audit.json", a)
    write_text(out / "audit.html", render_audit(a))
    return out / "audit.html"
