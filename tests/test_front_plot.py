"""The search's Pareto-front figure and report section, on a synthetic ``front.json``."""

import base64
import json
import re

import pytest

from refdir.outputs import front_plot
from refdir.outputs.front_plot import front_figure, front_section, pareto, save_front_png
from refdir.outputs.report import write_report

IMG = re.compile(r"<img src=['\"]data:image/png;base64,([A-Za-z0-9+/=]+)['\"]")


def _trial(n, refusal, kl, confirmed=None, paper=False):
    return {
        "number": n,
        "params": {"layer": 10 + n, "scale": 1.0},
        "paper": paper,
        "proxy": {"refusal": refusal, "kl": kl},
        "confirmed": confirmed,
        "seconds": 1.5,
    }


def _confirmed(refusal, kl):
    return {
        "refusal": refusal,
        "kl": kl,
        "n_harmful": 100,
        "n_harmless": 80,
        "refusal_by_judge": {"substring": refusal},
    }


def _front() -> dict:
    trials = [
        _trial(0, 0.10, 0.30, paper=True),
        _trial(1, 0.50, 0.02),
        _trial(2, 0.05, 0.08, confirmed=_confirmed(0.07, 0.09)),
        _trial(3, 0.60, 0.50),  # dominated
        _trial(4, 0.20, 0.01, confirmed=_confirmed(0.25, 0.012)),
        _trial(5, 0.02, 0.90),
    ]
    return {
        "model": "tiny/qwen2",
        "n_layers": 24,
        "objectives": ["refusal", "kl"],
        "trials": trials,
        "front": [4, 2, 5],
        "confirmed_front": [2, 4],
        "compare": [
            {
                "name": "heretic",
                "points": [
                    {"refusal": 0.3, "kl": 0.05, "label": "a"},
                    {"refusal": 0.1, "kl": 0.2},
                    {"refusal": 0.4, "kl": 0.3},  # dominated
                ],
                "chosen": {"refusal": 0.1, "kl": 0.2},
            }
        ],
    }


def _png_bytes(section: str) -> bytes:
    m = IMG.search(section)
    assert m, "no embedded PNG"
    return base64.b64decode(m.group(1))


def test_section_lists_the_confirmed_front_by_kl_with_its_counts():
    sec = front_section(_front())
    rows = re.findall(r"<tr><td>(\d+)</td><td>([\d.]+)</td><td>(\d+)</td><td>([\d.]+)</td>", sec)
    # trial 4 (KL 0.012) before trial 2 (KL 0.09); confirmed scores, not the proxy ones
    assert rows == [("4", "0.2500", "100", "0.0120"), ("2", "0.0700", "100", "0.0900")]
    assert "6 trials" in sec and "2 confirmed" in sec
    assert "<code>refdir export --run RUN --trial N</code>" in sec
    assert _png_bytes(sec).startswith(b"\x89PNG")


def test_section_without_a_confirmed_trial_says_so():
    front = _front()
    for t in front["trials"]:
        t["confirmed"] = None
    front["confirmed_front"] = []
    sec = front_section(front)
    assert "No trial confirmed yet" in sec and "0 confirmed" in sec
    assert _png_bytes(sec).startswith(b"\x89PNG")


def _drawn(monkeypatch, front: dict):
    """The figure front_figure draws, caught before it is encoded."""
    caught = []

    def keep(fig):
        caught.append(fig)
        return "data:image/png;base64,"

    monkeypatch.setattr(front_plot, "png_uri", keep)
    front_figure(front)
    return caught[0].axes[0]


def test_figure_draws_fronts_paper_point_and_the_compared_tool(monkeypatch):
    ax = _drawn(monkeypatch, _front())
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert list(lines["confirmed front"].get_xdata()) == [0.012, 0.09]
    assert list(lines["confirmed front"].get_ydata()) == [0.25, 0.07]
    assert list(lines["proxy front"].get_xdata()) == [0.01, 0.08, 0.90]
    assert lines["heretic front"].get_linestyle() == "--"
    assert list(lines["heretic front"].get_xdata()) == [0.05, 0.2]  # the dominated point left off
    legend = {t.get_text() for t in ax.get_legend().get_texts()}
    assert {"trial (proxy)", "proxy front", "confirmed front", "heretic", "heretic front"} <= legend
    notes = {t.get_text() for t in ax.texts}
    assert {"paper direction", "heretic chosen"} <= notes
    assert ax.get_xscale() == "log"
    assert "KL" in ax.get_xlabel() and "refusal rate" in ax.get_ylabel()


def test_figure_keeps_a_linear_kl_axis_when_a_kl_is_zero(monkeypatch):
    front = _front()
    front["trials"][1]["proxy"]["kl"] = 0.0
    assert _drawn(monkeypatch, front).get_xscale() == "linear"


def test_pareto_keeps_the_points_nothing_beats_on_both():
    pts = [
        {"refusal": 0.5, "kl": 0.1},
        {"refusal": 0.2, "kl": 0.3},
        {"refusal": 0.6, "kl": 0.2},  # beaten by the first
        {"refusal": float("nan"), "kl": 0.01},  # not drawable
        {"refusal": 0.2, "kl": 0.4},  # ties on refusal at a higher KL
    ]
    assert pareto(pts) == [{"refusal": 0.5, "kl": 0.1}, {"refusal": 0.2, "kl": 0.3}]


def test_write_report_includes_the_section_when_the_folder_has_front_json(tmp_path):
    (tmp_path / "front.json").write_text(json.dumps(_front()))
    page = write_report(tmp_path).read_text()
    assert "<h2>Refusal-edit search (Pareto front)</h2>" in page
    assert re.search(r"<tr><td>4</td>.*<tr><td>2</td>", page)
    assert _png_bytes(page).startswith(b"\x89PNG")


def test_write_report_leaves_the_section_out_without_front_json(tmp_path):
    assert "Refusal-edit search" not in write_report(tmp_path).read_text()


@pytest.mark.parametrize("as_str", [True, False])
def test_save_front_png_writes_the_figure(tmp_path, as_str):
    path = tmp_path / "front.png"
    save_front_png(_front(), str(path) if as_str else path)
    assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 5000
