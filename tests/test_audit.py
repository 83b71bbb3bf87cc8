"""The audit page's cells: numbers a reader can take in (3 significant digits), nothing raw."""

from refdir.outputs.audit import _fmt, _rows


def test_floats_read_to_three_significant_digits():
    assert _fmt(0.45999999999999996) == "0.46"
    assert _fmt(0.11254653) == "0.113"
    assert _fmt(0.000612) == "0.000612"
    assert _fmt(901.24) == "901"
    assert _fmt(100) == "100" and _fmt(None) == "" and _fmt("ablation") == "ablation"
    assert _fmt([-0.0123456, 0.0456789]) == "[-0.0123, 0.0457]"


def test_table_cells_carry_no_float_repr():
    page = _rows(["method", "rate"], [["ablation", 0.09000000000000001], ["<ortho>", None]])
    assert "0.09000000000000001" not in page and "<td>0.09</td>" in page
    assert "&lt;ortho&gt;" in page and "<td></td>" in page
