"""The report's false-refusal section (``refdir overrefusal``): how the direction was found and what its
ablation does to refusals of XSTest's safe prompts and of harmful prompts, every rate with its n."""

from __future__ import annotations

import html

from refdir.outputs.page import html_table

LABELS = {
    "baseline": "baseline",
    "refusal_ablation": "refusal direction ablated",
    "false_refusal_ablation": "false-refusal direction ablated",
}


def overrefusal_section(art: dict) -> str:
    """Kept-prompt rule, chosen candidate, the evaluation table and the best candidates' scores."""
    k, sel = art["kept"], art["selection"]
    parts = [
        "<h2>False refusals (Wang et al. 2025)</h2>",
        f"<p>Pseudo-harmful prompts ({html.escape(str(art.get('pseudo_harmful_source')))}): kept "
        f"{k['n_kept']} of {k['n_scored']} the model refuses at baseline (refusal log-odds &gt; "
        f"{k['threshold']:.3f}, {k['n_above_threshold']} above it; floor {k['floor']}); "
        f"{art['pseudo_harmful']['n_val']} held out to score the candidates.</p>",
    ]
    d = art.get("direction")
    if d:
        parts.append(
            f"<p>Chosen: layer {d['layer']}, position {d['pos']}; pseudo-harmful log-odds "
            f"{d['false_refusal']:.3f} (baseline {d['baseline_false_refusal']:.3f}), harmful "
            f"{d['harmful']:.3f} (baseline {d['baseline_harmful']:.3f}, floor {sel['harmful_floor']:.3f}), "
            f"KL {d['kl']:.4f}; |cos| with r̂ {abs(d['cos_with_refusal_direction']):.1e}.</p>"
        )
    ev = art.get("evaluation")
    if ev:
        judge = (ev.get("judge") or {}).get("refusal") or {}
        rows = [
            [
                split,
                LABELS.get(c, c),
                v["refusal_rate"],
                v["n"],
                (judge.get(f"{split}/{c}") or {}).get("refusal_rate"),
            ]
            for split, conds in ev["refusal"].items()
            for c, v in conds.items()
        ]
        name = (ev.get("judge") or {}).get("name") or "second judge"
        parts.append(
            html_table(["prompts", "condition", "refusal (substring)", "n", f"refusal ({name})"], rows)
        )
        kl = ev["kl_harmless_first"]
        parts.append(
            f"<p>First-token KL on {ev['n_harmless']} harmless prompts: refusal direction ablated "
            f"{kl['refusal_ablation']:.4f}, false-refusal direction ablated "
            f"{kl['false_refusal_ablation']:.4f}.</p>"
        )
    parts.append(_candidates_table(sel))
    return "".join(parts)


def _candidates_table(sel: dict, top: int = 10) -> str:
    """The ``top`` scored candidates by pseudo-harmful log-odds, with why each passed or not."""
    cells = [
        (fr, p, l) for p, row in enumerate(sel["false_refusal"]) for l, fr in enumerate(row) if fr is not None
    ]
    cells.sort()
    rows = [
        [l, p - len(sel["false_refusal"]), fr, sel["harmful"][p][l], sel["kl"][p][l], sel["reasons"][p][l]]
        for fr, p, l in cells[:top]
    ]
    return f"<p>Lowest pseudo-harmful log-odds of {len(cells)} scored candidates:</p>" + html_table(
        ["layer", "pos", "pseudo-harmful", "harmful", "KL", "verdict"], rows
    )
