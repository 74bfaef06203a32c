"""Paper-style tables (``selfrepair.tables``): significant digits, percentages, readable headers,
only the chosen columns, the full frame one click away, and the numbers shown equal the frame's
rounded values. Also: every chapter's table layouts name columns its frames have."""

from __future__ import annotations

import math
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selfrepair import tables
from selfrepair.errors import InputError
from selfrepair.tables import Layout, format_number, parse_number, table


@pytest.mark.parametrize("value, shown", [
    (7.533534, "7.53"), (0.0458123, "0.0458"), (-0.001626, "−0.00163"), (1234.56, "1,235"),
    (0.99999, "1.00"), (2.197921e-07, "2.20×10⁻⁷"), (-3.3e-05, "−3.30×10⁻⁵"), (0.0, "0"),
    (np.int64(8192), "8,192"), (5, "5"), (float("nan"), "—"), (None, "—"), (True, "yes"),
    (np.bool_(False), "no"), ("L1H0", "L1H0")])
def test_format_number(value, shown):
    assert format_number(value) == shown


def test_percent_and_digits():
    assert format_number(0.9066, percent=True) == "90.7%"
    assert format_number(1.0, percent=True) == "100.0%"
    assert format_number(7.533534, digits=2) == "7.5"
    with pytest.raises(InputError, match="digits"):
        format_number(1.0, digits=0)


def test_no_scientific_notation_in_ordinary_ranges():
    for v in np.geomspace(1e-4, 9.99e5, 60):
        for sign in (1, -1):
            assert "×10" not in format_number(sign * float(v)) and "e" not in format_number(sign * float(v))


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=-1e9, max_value=1e9, allow_nan=False).filter(lambda v: abs(v) > 1e-300),
       st.integers(1, 5))
def test_shown_number_is_the_value_rounded(value, digits):
    """Invariant: a cell reads back as the value to ``digits`` significant digits (integers-valued
    magnitudes of 10^digits and more keep their whole part)."""
    back = parse_number(format_number(value, digits))
    magnitude = math.floor(math.log10(abs(value)))
    if abs(value) >= 10 ** (digits - 1) and tables.ORDINARY[0] <= abs(value) < tables.ORDINARY[1]:
        assert back == pytest.approx(round(value), abs=0.5 + 1e-9)
    else:
        assert back == pytest.approx(float(f"{value:.{digits - 1}e}"), rel=1e-9, abs=10.0 ** (magnitude - digits))


class _Cells(HTMLParser):
    """The header and body text of every table in a piece of HTML."""

    def __init__(self):
        super().__init__()
        self.tables, self._cell, self._in_name = [], None, False

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append({"head": [], "rows": []})
        elif tag == "tr":
            self._row = []
        elif tag in ("th", "td"):
            self._cell = []
        elif tag == "span" and ("class", "column-name") in attrs:
            self._in_name = True

    def handle_endtag(self, tag):
        if tag in ("th", "td"):
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr":
            t = self.tables[-1]
            (t["rows"] if t["head"] else t["head"]).extend([self._row] if t["head"] else self._row)
        elif tag == "span":
            self._in_name = False

    def handle_data(self, data):
        if self._cell is not None and not self._in_name:
            self._cell.append(data)


@pytest.fixture
def frame() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({"label": ["L0H1", "L1H0", "L1H3"], "n": [50, 124, 8192],
                         "share_ratio_above_1": [0.72, 0.86, 0.98], "median_ratio": rng.normal(1, 0.01, 3),
                         "eq2_gap": [2.2e-7, 1.9e-7, 1.4e-7], "unused": rng.normal(0, 100, 3),
                         "from_block_norms": 0.0})


def test_table_html_shows_chosen_columns_and_the_full_frame(frame):
    t = table(frame, ["label", "n", "share_ratio_above_1", "median_ratio", "from_block_norms"],
              percent=["share_ratio_above_1"], names={"median_ratio": "median S/S′"},
              optional=["from_block_norms"])
    assert t.columns == ("label", "n", "share_ratio_above_1", "median_ratio")  # all-zero optional dropped
    parsed = _Cells()
    parsed.feed(t._repr_html_())
    shown, full = parsed.tables
    assert shown["head"] == ["head", "tokens", "share ratio above 1", "median S/S′"]
    # which row, then what is hidden: under a readable name where the library has one (issue 25: a
    # reader met abs_clean and ablated_layer), else the frame's own name
    assert full["head"] == ["head", "largest eq. 2 gap", "unused", "block norms"]
    assert '<th class="num" title="median_ratio">median S/S′</th>' in t._repr_html_()  # one header row
    assert '<th class="num" title="eq2_gap">largest eq. 2 gap</th>' in t._repr_html_()  # the frame's name on hover
    assert ">unused<" in t._repr_html_()
    assert "<details" in t._repr_html_() and "3 more columns (the rest of the computed values)" in t._repr_html_()
    for row, (_, values) in zip(shown["rows"], frame.iterrows()):
        assert row[0] == values["label"] and row[1] == f"{values['n']:,}"
        assert row[2] == f"{values['share_ratio_above_1'] * 100:.1f}%"
        assert parse_number(row[3]) == pytest.approx(float(f"{values['median_ratio']:.2e}"))
    for row, (_, values) in zip(full["rows"], frame.iterrows()):  # the hidden frame: same numbers
        assert row[0] == values["label"] and parse_number(row[1]) == pytest.approx(float(f"{values['eq2_gap']:.2e}"))
        assert "e-07" not in row[1] and "×10⁻⁷" in row[1]


def test_a_phone_shows_its_columns_and_folds_the_rest(frame):
    """``phone``: the other shown columns carry the class the phone CSS hides, and the fold lists
    them (shown there on a phone only) before the frame's hidden columns; its summary counts what
    each width leaves out."""
    t = table(frame, ["label", "n", "share_ratio_above_1", "median_ratio"], phone=["label", "median_ratio"])
    html = t._repr_html_()
    assert t.off_phone() == ["n", "share_ratio_above_1"]
    parsed = _Cells()
    parsed.feed(html)
    shown, full = parsed.tables
    # readable headers (issue 25: a fold's header is never a frame's snake_case name)
    assert full["head"] == ["head", "tokens", "share ratio above 1", "largest eq. 2 gap", "unused", "block norms"]
    assert '<th class="num wide-only" title="n">' in html and '<th class="num" title="median_ratio">' in html
    import re  # n, share in the fold (header + rows), shown on a phone alone: hidden without the CSS
    assert len(re.findall(r'class="num phone-only"[^>]* hidden>', html)) == 2 * (1 + len(frame))
    assert ('<span class="wide-only">3 more columns</span><span class="phone-only" hidden>5 more columns</span>'
            in html)
    # every frame column shown on a laptop: the fold is the phone's alone
    every = table(frame[["label", "n", "eq2_gap"]], phone=["label", "eq2_gap"])._repr_html_()
    assert '<details class="selfrepair-table-all phone-only" hidden><summary>1 more column' in every
    with pytest.raises(InputError, match="phone"):
        table(frame, ["label", "n"], phone=["n"])  # which row: the first column stays
    with pytest.raises(InputError, match="no column"):
        table(frame, ["label", "n"], phone=["label", "nope"])
    assert table(frame, ["label", "from_block_norms"], optional=["from_block_norms"],
                 phone=["label", "from_block_norms"]).phone == ("label",)  # an optional column left out


def test_a_stacked_table_labels_each_cell_with_its_header(frame):
    """``stacked``: a phone shows each row as a block; each cell carries its header (the CSS's
    ``attr(data-label)``), escaped; the fold (the frame's names) is not labelled."""
    html = table(frame, ["label", "n"], names={"n": "tokens <all>"}, stacked=True)._repr_html_()
    shown = html[:html.index("<details")]
    assert 'class="selfrepair-table stacked"' in shown and 'data-label="tokens &lt;all&gt;"' in shown
    assert shown.count("data-label=") == 2 * len(frame) and "data-label" not in html[html.index("<details"):]
    assert "data-label" not in table(frame, ["label", "n"])._repr_html_()


def test_the_phone_css_uses_the_tables_classes_and_width():
    """The classes tables.py writes are the ones book/_static/selfrepair.css styles, inside the
    phone's @media rule (max-width: tables.PHONE_PX)."""
    from pathlib import Path

    css = (Path(__file__).resolve().parents[1] / "book" / "_static" / "selfrepair.css").read_text()
    phone = css[css.index(f"@media (max-width: {tables.PHONE_PX}px) {{\n  .selfrepair-chart"):]
    for rule in (f".{tables.WIDE_ONLY} {{ display: none; }}", f"td.{tables.PHONE_ONLY}",
                 f"table.selfrepair-table.{tables.STACKED} thead {{ display: none; }}", "attr(data-label)"):
        assert rule in phone, rule
    assert f".selfrepair-table-box .{tables.PHONE_ONLY} {{ display: none; }}" in css[:css.index(phone)]


def test_layout_and_errors(frame):
    layout = Layout(("label", "unused"), names={"unused": "a number"})
    t = layout(frame)
    assert list(t.shown().columns) == ["head", "a number"] and t.frame is frame
    assert "L1H3" in repr(t)
    with pytest.raises(InputError, match="no column 'missing'.*it has label"):
        table(frame, ["label", "missing"])
    series = table(pd.Series({"model": "tiny-gpt_neox", "n_layers": 2, "revision": None}, name="value"))
    assert series.cells() == [["model", "tiny-gpt_neox"], ["n_layers", "2"], ["revision", "—"]]


def test_every_column_shown_is_shown_once(frame):
    """A table showing every column of its frame has no folded copy of itself."""
    html = table(frame[["label", "n"]])._repr_html_()
    assert html.count("<table") == 1 and "<details" not in html


def test_integer_columns_stay_integers():
    """An all-numeric frame: iterating rows would upcast ``layer`` and ``n_heads`` to floats
    ("1.00", "4.00"); a float column of whole layer indices (a groupby's output) is shown whole,
    a float column of means that happen to be whole is not."""
    f = pd.DataFrame({"layer": [0, 1, 10], "n_heads": [4, 4, 4], "abs_error": [0.0069, 0.0016, 0.5],
                      "readout_layer": [2.0, 3.0, float("nan")], "mean_share": [1.0, 2.0, 3.0]})
    cells = table(f).cells()
    assert [r[:2] for r in cells] == [["0", "4"], ["1", "4"], ["10", "4"]]
    assert [r[3] for r in cells] == ["2", "3", "—"] and cells[0][4] == "1.00"
    assert tables.integer_column("n_tokens", pd.Series([8192.0])) and not tables.integer_column("share", pd.Series([1.0]))
    assert not tables.integer_column("layer", pd.Series([True, False]))


@pytest.mark.parametrize("n, noun, want", [(1, ("draw",), "1 draw"), (3, ("draw",), "3 draws"),
                                           (0, ("patch", "patches"), "0 patches"), (1, ("patch", "patches"), "1 patch"),
                                           (8192, ("token",), "8,192 tokens")])
def test_counted(n, noun, want):
    assert tables.counted(n, *noun) == want


def test_listed():
    assert tables.listed([3], "layer") == "layer 3"
    assert tables.listed([0, 5, 16], "layer") == "layers 0, 5 and 16"


def test_folded_shows_one_line_and_the_table_behind_a_click():
    f = pd.DataFrame({"item": ["model", "n_layers"], "value": ["tiny-gpt_neox", "2"]})
    shown = tables.folded(f, "Ran on tiny-gpt_neox & more.", "Every version")
    html = shown._repr_html_()
    assert html.index("Ran on tiny-gpt_neox &amp; more.") < html.index("<details")
    assert "<summary>Every version</summary>" in html and html.count("<table") == 1
    assert repr(shown) == f.to_string()  # the text form is the frame's


def test_html_escapes_cells():
    t = table(pd.DataFrame({"reason": ["<script>x</script> & more"]}))
    assert "<script>" not in t._repr_html_() and "&lt;script&gt;" in t._repr_html_()


def _layouts():
    from selfrepair.chapters import across, atp, existence, hydra_text, intro, layernorm, neurons
    from selfrepair.exercises import plan

    return {f"{m.__name__.rsplit('.', 1)[-1]}.{name}": obj
            for m in (intro, existence, layernorm, neurons, across, atp, hydra_text, plan)
            for name, obj in vars(m).items() if isinstance(obj, Layout)}


def test_chapters_declare_table_layouts():
    names = set(_layouts())
    assert {"intro.TOY_TABLE", "intro.CLOSURE_TABLE", "existence.SUMMARY_TABLE", "existence.FEATURED_TABLE",
            "layernorm.HEADS_TABLE", "layernorm.RATIOS_TABLE", "layernorm.CHECK_TABLE",
            "neurons.HEADS_TABLE", "neurons.SUMMARY_TABLE", "across.CLAIMS_TABLE"} <= names
    for name, layout in _layouts().items():
        # a share the fold shows prints as a percentage too (issue 25: chapter 3's fold had "0.104"
        # beside the table's "78.5%"): ``percent`` may name fold columns, which table() checks
        # against the frame; the shown ones among them are the layout's own
        assert set(layout.percent) & set(layout.columns) or not layout.percent, name
        assert layout.phone is None or (set(layout.phone) <= set(layout.columns)
                                        and layout.phone[0] == layout.columns[0]), name  # which row: first
        assert len(layout.columns) <= 11, f"{name}: a table a page can hold shows a few columns"


def test_notebook_tables_are_paper_tables(book):
    """Every table an executed chapter shows is a paper-style table (or the provenance table),
    with no e+00 notation, and its numbers are those of the frame behind it."""
    import json

    for name, run in book.runs.items():
        nb = json.loads(run.executed.read_text(encoding="utf-8"))
        for cell in nb["cells"]:
            for out in cell.get("outputs", []):
                page = "".join(out.get("data", {}).get("text/html", ""))
                if "<table" not in page or "selfrepair-chart" in page:
                    continue
                is_provenance = "provenance(" in "".join(cell["source"])
                assert tables.TABLE_CLASS in page or is_provenance, \
                    f"{name}: a DataFrame dump in `{''.join(cell['source']).strip()[-60:]}`"
                assert not re.search(r"\d\.\d+e[+-]\d\d", re.sub(r"<[^>]+>", " ", page)), name


def test_chapter5_tables_name_every_column_even_in_their_folds():
    """Issue 25: a reader met ``abs_clean`` and ``ablated_layer`` as headers in chapter 5."""
    import pandas as pd

    from selfrepair.chapters.hydra_text import LOCAL_TABLE, OWN_TABLE
    from selfrepair.hydra_controls import localisation_summary, own_summary

    own = pd.DataFrame({"ablation": ["resample", "zero"], "layer": [1, 1], "kind": ["attn", "attn"],
                        "label": ["A1", "A1"], "n_patches": [3, 1], "abs_clean": [0.4, 0.4], "abs_ablated": [0.1, 0.0],
                        "abs_patch": [0.2, 0.0], "ratio": [0.25, 0.0], "patch_ratio": [0.5, 0.0],
                        "mean_clean": [0.3, 0.3], "mean_ablated": [0.05, 0.0]})
    loc = pd.DataFrame({"ablated_layer": [0, 0], "ablated_kind": ["attn", "attn"], "readout": ["A1", "M1"],
                        "readout_kind": ["attn", "mlp"], "position": ["downstream"] * 2, "abs_delta_de": [0.2, 0.1]})
    for layout, frame in ((OWN_TABLE, own_summary(own)), (LOCAL_TABLE, localisation_summary(loc))):
        t = layout(frame)
        html = t._repr_html_()
        for c in frame.columns:
            assert t.named(c) or c in t.columns and "_" not in c, c
            assert f">{c}<" not in html.replace("<wbr>", "") or "_" not in c, c


# -- issue 25: a fold holds only what the table leaves out, under readable headers -------------------
def _without_css(html: str) -> str:
    """The page as a reader without the book's CSS meets it (a text dump, a reader view, print):
    every element carrying ``hidden`` left out."""
    import re

    for tag in ("td", "th", "span"):
        html = re.sub(rf"<{tag}[^>]* hidden[^>]*>.*?</{tag}>", "", html, flags=re.S)
    return re.sub(r"<details[^>]* hidden[^>]*>.*?</details>", "", html, flags=re.S)


def test_without_the_css_a_fold_repeats_no_column_of_the_table(frame):
    """The introduction's live check and its teaching plan: a phone's fold held the columns the
    laptop's table shows, and a reader without CSS met them twice."""
    for cols, phone in ((["label", "n", "share_ratio_above_1", "median_ratio"], ["label", "median_ratio"]),
                        (list(frame.columns), ["label", "eq2_gap"])):
        plain = _without_css(table(frame, cols, phone=phone)._repr_html_())
        parsed = _Cells()
        parsed.feed(plain)
        shown, *fold = parsed.tables
        assert len(shown["head"]) == len(cols)  # the laptop's table, whole
        if fold:
            assert set(fold[0]["head"][1:]).isdisjoint(shown["head"]), fold[0]["head"]
        assert "more columns</span>" not in plain.replace('wide-only">', "") or "phone-only" not in plain
    every = _without_css(table(frame[["label", "n", "eq2_gap"]], phone=["label", "eq2_gap"])._repr_html_())
    assert "<details" not in every  # the fold is the phone's alone: gone


def test_a_fold_names_its_columns_in_words_and_leaves_out_what_the_label_says():
    """Fold headers were a frame's names (``n_positive_de``, ``attn_s1``); ``layer`` and ``head``
    repeated the label ``L3H1`` the table shows."""
    f = pd.DataFrame({"label": ["L3H1", "L0H2"], "layer": [3, 0], "head": [1, 2], "n_positive_de": [4, 5],
                      "attn_s1": [0.1, 0.2], "fig7_anti_erasure": [0.3, -0.4], "fold_value_biases": [True, False]})
    t = table(f, ["label"])
    assert t.left_out() == ["n_positive_de", "attn_s1", "fig7_anti_erasure", "fold_value_biases"]
    parsed = _Cells()
    parsed.feed(t._repr_html_())
    _, fold = parsed.tables
    assert fold["head"] == ["head", "number of positive DE", "attention S1", "Fig 7 anti-erasure", "value biases folded"]
    assert '<th class="num" title="n_positive_de">number of positive DE</th>' in t._repr_html_()  # the name on hover
    assert all("_" not in h for h in fold["head"])
    # a label that does not name its row's layer and head: they stay
    other = f.assign(label=["A3", "M0"])
    assert table(other, ["label"]).left_out()[:2] == ["layer", "head"]
    assert tables.readable("mean_abs_delta_logit") == "mean absolute Δlogit" and tables.readable("label") == "head"


def test_identifier_columns_print_as_plain_integers():
    """Issue 25 (read3 #31): chapter 3's fold printed neuron indices as "1,451" and "1,026" while the
    prose says "neuron 1026": an identifier (neuron, layer, head, index) is no quantity and prints
    without a thousands separator; a count keeps its separator."""
    f = pd.DataFrame({"max_top_neuron": [1451, 1026], "neuron": [2047.0, 12.0], "d_mlp": [2048, 2048],
                      "n_tokens": [8192, 8192]})
    cells = table(f).cells()
    assert cells[0][:2] == ["1451", "2047"] and cells[1][:2] == ["1026", "12"]
    assert cells[0][2:] == ["2,048", "8,192"]
    assert tables.identifier_name("max_top_neuron") and not tables.identifier_name("n_heads")
