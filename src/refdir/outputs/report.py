"""A self-contained ``report.html`` for a run folder: heatmaps, refusal bars, KL/CE table, examples.

Images are PNGs embedded as base64; the page needs no network and no other file.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from pathlib import Path

from refdir.core.io import read_jsonl, write_text
from refdir.outputs.front_plot import front_section
from refdir.outputs.overrefusal_section import overrefusal_section
from refdir.outputs.overrefusal_table import overrefusal_html
from refdir.outputs.page import html_table, png_uri, save_png
from refdir.run.folder import RunFolder


def heatmaps(selection: dict, post_tokens: list[str] | None = None) -> str:
    """Layer × position heatmaps of bypass, induce and KL (grey where not scored).

    Where pruning left a candidate's bypass unscored, the linear screen's first-order estimate fills the
    cell, hatched and said so in the title: the figure reads like the paper's without claiming more."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.2))
    for ax, key, cmap in zip(axes, ("bypass", "induce", "kl"), ("RdBu_r", "RdBu_r", "viridis")):
        arr = np.array([[np.nan if v is None else v for v in row] for row in selection[key]], dtype=float)
        est = None
        if key == "bypass" and selection.get("screen"):
            screen = np.array(
                [[np.nan if v is None else v for v in row] for row in selection["screen"]], dtype=float
            )
            est = np.isnan(arr) & ~np.isnan(screen)
            arr = np.where(est, screen, arr)
        im = ax.imshow(arr, aspect="auto", cmap=cmap, interpolation="nearest")
        ax.set_facecolor("#ddd")
        title = {
            "bypass": "bypass (refusal metric, ablated)",
            "induce": "induce (refusal metric, +r)",
            "kl": "KL on harmless (ablated)",
        }[key]
        if est is not None and est.any():
            ys, xs = np.nonzero(est)
            ax.scatter(xs, ys, marker="x", s=10, c="k", linewidths=0.5)
            title += f"\nx: linear-screen estimate ({int(est.sum())} cells)"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("layer")
        ax.set_yticks(range(arr.shape[0]))
        ax.set_yticklabels(
            (
                [repr(t)[1:-1] for t in post_tokens]
                if post_tokens and len(post_tokens) == arr.shape[0]
                else [str(i - arr.shape[0]) for i in range(arr.shape[0])]
            ),
            fontsize=7,
        )
        if selection.get("chosen"):
            p, l = selection["chosen"]
            ax.scatter([l], [p], marker="*", s=140, c="gold", edgecolors="k")
        fig.colorbar(im, ax=ax)
    return png_uri(fig)


def refusal_bars(refusal: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values, colors = [], [], []
    for split, color in (("harmful", "#c0392b"), ("harmless", "#2471a3")):
        for cond, m in refusal.get(split, {}).items():
            labels.append(f"{split}\n{cond}")
            values.append(m["refusal_rate"])
            colors.append(color)
    fig, ax = plt.subplots(figsize=(1.3 * len(labels) + 1, 3))
    ax.bar(range(len(values)), values, color=colors)
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("refusal rate (substring)")
    for i, v in enumerate(values):
        ax.text(i, v + 0.02, f"{v:.2f}", ha="center", fontsize=8)
    return png_uri(fig)


def suffix_figures(sa: dict) -> str:
    """Fig. 5 (cosine with r̂ per layer) and Fig. 6 (refusal heads, attention hijacking) side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(16, 3.6))
    ax = axes[0]
    for name, c in sa["cosine_per_layer"].items():
        m, sd = np.array(c["mean"]), np.array(c["sd"])
        ax.plot(m, label=name)
        ax.fill_between(range(len(m)), m - sd, m + sd, alpha=0.2)
    ax.set_xlabel("layer")
    ax.set_ylabel("cos(resid, r̂) at last position")
    ax.legend(fontsize=7)
    heads = [f"L{l}H{h}" for l, h in sa["top_heads"]]
    x = np.arange(len(heads))
    ax = axes[1]
    for i, (name, vals) in enumerate(sa["head_attribution"].items()):
        ax.bar(x + (i - 1) * 0.27, vals, width=0.27, label=name)
    ax.set_xticks(x)
    ax.set_xticklabels(heads, rotation=45, fontsize=7)
    ax.set_ylabel("attribution onto r̂")
    ax.legend(fontsize=7)
    ax = axes[2]
    for i, name in enumerate(("harmful+random", "harmful+adversarial")):
        m = sa["attention_mass"][name]
        ax.bar(x + (i - 0.5) * 0.4, m["instruction"], width=0.4, label=f"{name}: instruction")
        ax.bar(
            x + (i - 0.5) * 0.4,
            m["suffix"],
            width=0.4,
            bottom=m["instruction"],
            label=f"{name}: suffix",
            alpha=0.6,
        )
    ax.set_xticks(x)
    ax.set_xticklabels(heads, rotation=45, fontsize=7)
    ax.set_ylabel("attention from last position")
    ax.legend(fontsize=6)
    return png_uri(fig)


def _first_sentence(text: str, limit: int = 90) -> str:
    line = " ".join(text.split())
    for sep in (". ", "! ", "? ", ":"):
        if sep in line:
            line = line.split(sep)[0] + sep.strip()
            break
    return line[:limit] + ("…" if len(line) > limit else "")


def cone_section(cone: dict) -> str:
    """Refusal rate and KL against the rank of the ablated subspace, and the table behind the plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = cone["ranks"]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([r["rank"] for r in rows], [r["refusal_rate"] for r in rows], "o-", label="refusal rate")
    ax.set_xlabel("rank of the ablated subspace")
    ax.set_ylabel(f"refusal rate (n={rows[0]['n']})")
    ax.set_ylim(0, 1)
    ax2 = ax.twinx()
    ax2.plot([r["rank"] for r in rows], [r["kl"] for r in rows], "s--", color="tab:red", label="KL")
    ax2.set_ylabel(f"first-token KL (n={rows[0]['n_kl']})", color="tab:red")
    return f"<h2>Refusal cone</h2><img src='{png_uri(fig)}'>" + html_table(
        ["rank", "refusal rate", "n", "KL", "bypass", "how the basis was built"],
        [[r["rank"], r["refusal_rate"], r["n"], r["kl"], r["bypass"], r["method"]] for r in rows],
    )


def _monitor_section(mon: dict) -> str:
    """The refusal monitor: detection quality at the direction's layer for each read position."""
    n = mon["n_evaluation"]
    rows = [
        [
            r,
            v["auroc"],
            v["tpr_at_1pct_fpr"],
            v["flagged_harmful"],
            v["flagged_harmless"],
            (mon.get("suffix") or {}).get("flagged", {}).get(r, {}).get("with_gcg_suffix", ""),
        ]
        for r, v in mon["evaluation"].items()
    ]
    best = max(((r, max(s["auroc"])) for r, s in mon["sweep"].items()), key=lambda x: x[1])
    return (
        f"<h2>Refusal monitor</h2><p>Projection onto r̂ at layer {mon['layer']}; threshold "
        f"{mon['threshold']:.3f} ({html.escape(mon['threshold_rule'])}; {mon['n_calibration']['harmful']}+"
        f"{mon['n_calibration']['harmless']} prompts). Measured on {n['harmful']} harmful and "
        f"{n['harmless']} harmless evaluation prompts (TPR at 1% FPR: at most "
        f"{int(0.01 * n['harmless'])} harmless prompt(s) above the threshold); the last column is the "
        f"fraction of GCG-suffixed harmful prompts flagged.</p>"
        + html_table(
            ["read", "AUROC", "TPR@1%FPR", "flagged harmful", "flagged harmless", "flagged +GCG suffix"], rows
        )
        + f"<p class=note>Best AUROC over all layers: {best[1]:.3f} ({html.escape(best[0])}).</p>"
    )


def capabilities_section(caps: dict) -> str:
    """The paper's Table 3 layout: orthogonalized score, then baseline (paired Δ ± 95% CI), in points."""
    from refdir.evaluation.capabilities import table_rows

    st = caps["settings"]
    minutes = {
        r["task"]: (r.get("baseline_seconds", 0) + r.get("orthogonalized_seconds", 0)) / 60
        for r in caps["results"]
    }
    rows = [
        [t, r["metric"], n, o, b, f"{minutes[t]:.1f}"]
        for (t, n, o, b), r in zip(table_rows(caps), caps["results"])
    ]
    return (
        "<h2>Capability benchmarks</h2><p>lm-evaluation-harness "
        f"({html.escape(str(st.get('harness')))}), no chat template, few-shot "
        f"{st.get('num_fewshot') if st.get('num_fewshot') is not None else 'per task'}, limit "
        f"{st.get('limit') or 'none'}; data "
        f"{html.escape(str(st.get('data_dir') or 'the harness hub datasets'))}. "
        "Both conditions on the same items: Δ is the paired mean difference, its interval "
        "±1.96 sd(Δ)/√n; for right/wrong metrics also the items lost and gained and the exact McNemar "
        "p-value (the normal interval is too narrow when few items change). The paper (Table 6) finds "
        "|Δ| ≲ 2 points except TruthfulQA (−1 to −6).</p>"
        + html_table(
            ["task", "metric", "n", "orthogonalized", "baseline (Δ ± 95% CI)", "minutes (both)"], rows
        )
    )


def jailbreaks_section(jb: dict) -> str:
    """The paper's Table 2 layout: one row per attack, refusal and compliance by every judge."""
    judges = jb["judges"]
    heads = ["condition", "n"] + [f"{h} ({j})" for j in judges for h in ("refusal", "compliance")]
    rows = [
        [r["condition"], r["n"]] + [r[k].get(j) for j in judges for k in ("refusal", "compliance")]
        for r in jb["rows"]
    ]
    notes = "".join(
        f"<li>{html.escape(r['condition'])}: {html.escape(r['note'])}</li>"
        for r in jb["rows"]
        if r.get("note")
    )
    return (
        f"<h2>Jailbreaks (paper Table 2)</h2><p>The same {jb['n_prompts']} harmful evaluation prompts, "
        f"greedy, {jb['max_new_tokens']} new tokens; compliance is the fraction each judge scores as "
        "answered.</p>" + html_table(heads, rows) + (f"<ul class=note>{notes}</ul>" if notes else "")
    )


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}
th{background:#f4f4f4}img{max-width:100%}code{background:#f4f4f4;padding:1px 4px}
.note{color:#666;font-size:13px}"""


def _load(path: Path) -> dict | None:
    """A run-folder JSON artifact, or None where the run has not written it."""
    return json.loads(path.read_text()) if path.exists() else None


def _prompts_section(prompts: dict) -> str:
    """Split sizes, the filter rule and its outcome, the refusal tokens and the exact prompt format."""
    f, pf = prompts["filter"], prompts["prompt_format"]
    splits = (
        "harmful_train",
        "harmful_val",
        "harmless_train",
        "harmless_val",
        "eval_harmful",
        "eval_harmless",
    )
    return (
        "<h2>Prompts</h2>"
        + html_table(["split", "n"], [[k, len(prompts[k])] for k in splits])
        + f"<p>Filter rule: <b>{f['rule']}</b> (requested {f['requested']}; metric/generation agreement "
        f"{f['metric_generation_agreement']:.2f}); "
        f"harmful kept {f['harmful_kept']}/{f['harmful_screened']}, "
        f"harmless kept {f['harmless_kept']}/{f['harmless_screened']}. Refusal tokens: "
        f"<code>{html.escape(str(prompts['refusal_tokens']['tokens']))}</code>.</p>"
        f"<p>Exact prompt format:</p><pre>{html.escape(pf['example'])}</pre>"
        f"<p class=note>post-instruction tokens: {html.escape(str(pf['post_instruction_tokens']))}</p>"
    )


def _selection_section(folder: RunFolder, sel: dict, prompts: dict | None) -> list[str]:
    """The candidates' heatmaps (also saved beside the report), their outcomes and the baselines."""
    post = prompts["prompt_format"]["post_instruction_tokens"] if prompts else None
    img = heatmaps(sel, post)
    save_png(folder.heatmaps, img)
    return [
        f"<h2>Direction selection</h2><img src='{img}'>",
        "<p>Candidate outcomes</p>"
        + html_table(["outcome", "candidates"], [[k, v] for k, v in sorted(sel["counts"].items())])
        + "<p>Baselines (no intervention, validation prompts)</p>"
        + html_table(["measure", "value"], [[k, v] for k, v in sel["baseline"].items()]),
    ]


def _kl_ce_section(ev: dict) -> str:
    """KL and cross-entropy of every condition on harmless prompts."""
    text = ev.get("ce_harmless_text") or {}
    heads = [
        "condition",
        "KL first token",
        "KL mean (16 tok)",
        "CE on baseline completions",
        "CE on harmless instruction+response text",
    ]
    rows = [
        [c, v["kl_first"], v["kl_mean"], v["ce"], text.get(c, {}).get("ce")]
        for c, v in ev["kl_ce_harmless"].items()
    ]
    return "<h2>KL and cross-entropy on harmless prompts</h2>" + html_table(heads, rows)


def _judge_section(j: dict) -> list[str]:
    """The second judge: its agreement with the substring judge and the first disagreements."""
    asked = j["judge"] == "self+evasive"  # the plain chat judge asks about refusal only
    rows = [
        [
            c,
            v["agreement"],
            v["refusal_rate"],
            v["evasive_rate"] if asked else "not asked",
            len(v["disagreements"]),
        ]
        for c, v in j["conditions"].items()
    ]
    heads = ["condition", "agreement with substring", "judge refusal rate", "evasive", "disagreements"]
    parts = [
        f"<h2>Second judge ({html.escape(str(j['kind']))}: {html.escape(str(j['judge']))})</h2>"
        + html_table(heads, rows)
    ]
    dis = [
        [
            c,
            d["prompt"][:60],
            "yes" if d["substring_refused"] else "no",
            d["judge"],
            _first_sentence(d["completion"], 60),
        ]
        for c, v in j["conditions"].items()
        for d in v["disagreements"][:5]
    ]
    if dis:
        parts.append(
            "<p class=note>Disagreements (first 5 per condition):</p>"
            + html_table(["condition", "prompt", "substring refused", "judge", "completion"], dis)
        )
    return parts


def _examples_section(completions: Path) -> str:
    """A few completions per condition, cut to one line (harmful ones to their first sentence)."""
    rows = read_jsonl(completions)
    ex = []
    for split, cond in (
        ("harmful", "baseline"),
        ("harmful", "ablation"),
        ("harmless", "baseline"),
        ("harmless", "actadd+"),
    ):
        for r in [r for r in rows if r["split"] == split and r["condition"] == cond][:3]:
            text = _first_sentence(r["completion"], 60 if split == "harmful" else 100)
            ex.append([split, cond, r["prompt"][:70], "yes" if r["refused"] else "no", text])
    return (
        "<h2>Example completions</h2><p class=note>Cut to one line; harmful ones to their "
        "first sentence.</p>" + html_table(["split", "condition", "prompt", "refused", "completion"], ex)
    )


def _evaluation_section(folder: RunFolder, ev: dict) -> list[str]:
    """The chosen direction, refusal rates (also saved beside the report), KL/CE, the second judge, the
    orthogonalization check and example completions."""
    d = ev["direction"]
    sc = d["scores"]
    parts = [
        "<h2>Chosen direction</h2>"
        + html_table(
            ["layer", "pos", "norm", "bypass", "induce", "KL"],
            [[d["layer"], d["pos"], d["norm"], sc.get("bypass"), sc.get("induce"), sc.get("kl")]],
        )
    ]
    img = refusal_bars(ev["refusal"])
    save_png(folder.refusal_rates, img)
    parts.append(f"<h2>Refusal rate per condition</h2><img src='{img}'>")
    if ev.get("overrefusal"):
        parts.append(overrefusal_html(ev["overrefusal"], html_table))
    parts.append(_kl_ce_section(ev))
    if ev.get("judge"):
        parts += _judge_section(ev["judge"])
    oc = ev["ortho_check"]
    parts.append(
        f"<p>Orthogonalized weights vs hook ablation: max |Δlogit| = "
        f"{oc['max_abs_logit_diff_vs_ablation']:.2e}"
        f" on {oc['n_prompts']} prompts (exact by construction: {oc['exact_by_construction']}).</p>"
    )
    if folder.completions.exists():
        parts.append(_examples_section(folder.completions))
    return parts


def _suffix_section(sa: dict, sj: dict | None) -> list[str]:
    """The paper's §5 figures of the adversarial suffix, after the GCG run's refusal rates."""
    parts = ["<h2>Adversarial suffix analysis (paper §5)</h2>"]
    if sj:
        r = sj["refusal_rate"]
        parts.append(
            f"<p>GCG: {sj['steps']} steps, {sj['seconds']} s on {sj['n_train_prompts']} prompts; "
            f"held-out refusal rate (n={sj['n_eval']}): none {r['none']:.2f}, random suffix "
            f"{r['random']:.2f}, adversarial suffix {r['adversarial']:.2f}.</p>"
        )
    parts.append(f"<img src='{suffix_figures(sa)}'>")
    return parts


def write_report(run_path: str | Path) -> Path:
    """Render ``report.html`` from whatever artifacts the run folder holds."""
    folder = RunFolder(run_path)
    cfg = _load(folder.config) or {}
    prompts, sel, ev = _load(folder.prompts), _load(folder.selection), _load(folder.eval)
    parts = [
        f"<h1>refdir report</h1><p>model <code>{html.escape(str(cfg.get('model_spec')))}</code>, "
        f"refdir {html.escape(str(cfg.get('refdir')))}, seed {cfg.get('seed')}</p>"
    ]
    if prompts:
        parts.append(_prompts_section(prompts))
    if sel:
        parts += _selection_section(folder, sel, prompts)
    if ev:
        parts += _evaluation_section(folder, ev)
    sa = _load(folder.suffix_analysis)
    if sa:
        parts += _suffix_section(sa, _load(folder.suffix))
    # the optional analyses, each from its artifact when the run folder has it
    sections: list[tuple[Path, Callable[[dict], str]]] = [
        (folder.jailbreaks, jailbreaks_section),
        (folder.capabilities, capabilities_section),
        (folder.cone, cone_section),
        (folder.monitor, _monitor_section),
        (folder.overrefusal, overrefusal_section),
        (folder.file("front.json"), front_section),  # refdir search
    ]
    for path, section in sections:
        art = _load(path)
        if art:
            parts.append(section(art))
    page = (
        f"<!doctype html><html><head><meta charset=utf-8><title>refdir report</title>"
        f"<style>{CSS}</style></head>"
        f"<body>{''.join(parts)}</body></html>"
    )
    write_text(folder.report, page)
    return folder.report
