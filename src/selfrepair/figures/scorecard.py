"""Figure for chapter 09, the scorecard: every claim's verdict on every model at a glance.

A pure function of the scorecard's frame (:func:`selfrepair.scorecard.build`, one row per claim,
model and verdict): one cell per claim (rows, in the book's order, each claim's words whole on as
many lines as they need) and model (columns), coloured by the verdict; a claim decided on several
runs of one model (chapter 6) splits its cell into one strip per run. The tooltip carries the estimate with its interval and n.
"""

from __future__ import annotations

import json

import altair as alt
import numpy as np
import pandas as pd

from ..reading import short_label
from ..scorecard import DECIDED, STATUSES
from .legible import label_limit, wrap

# colour-blind-safe (blue and orange, not green against red), each at least 3:1 on white and 4:1 under its
# black text, and each verdict also carries a mark in its cell (:data:`MARKS`), so no reading needs colour
COLORS = {"holds": "#4393c3", "differs": "#d9661c", "cannot tell": "#8f8f8f", "not tested": "#f2f2f2",
          "rule changed": "#a66f00", "not run": "#ffffff"}
# marks from Latin-1 and geometric shapes, not the dingbats (✓ ✗) many systems draw as emoji or a box
MARKS = {"holds": "●", "differs": "×", "cannot tell": "?", "not tested": "–", "rule changed": "!", "not run": "–"}
LABEL_CHARS = 34  # a claim's short label (:func:`~selfrepair.reading.short_label`) wraps at this many characters
LINE_PX = 12  # height of one line of a label
GAP_PX = 4  # between two claims' rows
MAX_LINES = 2  # a row's label: its short label's first lines, so the grid stays short
CELL_PX = 128  # the text a cell prints is cut (…) beyond this width: a phone leaves about this to one model


def verdict_cells(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: ``claim_label`` ("NN · statement"), ``model``, ``verdict`` and the text
    the tooltip shows; the order of the claims is the book's."""
    out = frame[["chapter", "claim", "statement", "model", "verdict", "estimate", "n", "unit"]].copy()
    out["claim_label"] = out["chapter"] + " · " + out["statement"].map(short_label)
    out["cell_text"] = [f"{MARKS.get(v, '')} {short_estimate(e) if v in DECIDED else v}"
                        for v, e in zip(out["verdict"], out["estimate"])]
    out["entry"] = out.groupby(["claim_label", "model"]).cumcount()  # the run, where a model has several
    out["n_text"] = [("" if n is None or pd.isna(n) else f"{int(n):,} {u}") for n, u in zip(out["n"], out["unit"])]
    return out.drop(columns=["n", "unit"])


def short_estimate(estimate) -> str:
    """The estimate as its cell prints it: the value without its interval (the tooltip and the
    table below give the interval): "72%", "a fall of 456%"."""
    return str(estimate or "").split(" (", 1)[0]


def _two_lines(lines: list[str]) -> list[str]:
    """At most :data:`MAX_LINES` lines, the last ending "…" where the label goes on (the tooltip and
    the table below give the whole statement)."""
    return lines if len(lines) <= MAX_LINES else [*lines[:MAX_LINES - 1], lines[MAX_LINES - 1] + " …"]


def claim_rows(order: list[str], chars: int = LABEL_CHARS) -> pd.DataFrame:
    """Per claim label (in ``order``): its ``lines`` (:func:`~selfrepair.figures.legible.wrap`)
    and its row's ``top`` and ``height`` in px from the chart's top — a row as tall as its label,
    so a short claim takes one line and a long one is read whole — and ``first``, where the label's
    first line hangs from (its top)."""
    lines = [_two_lines(wrap(c, chars)) for c in order]
    height = np.array([len(x) * LINE_PX + GAP_PX for x in lines])
    top = np.concatenate([[0], np.cumsum(height)[:-1]])
    return pd.DataFrame({"claim_label": order, "lines": lines, "top": top, "height": height,
                         "first": top + GAP_PX / 2})


def fig_verdicts(frame: pd.DataFrame) -> alt.Chart:
    """Claims (rows, each as tall as its label: :func:`claim_rows`) by model (columns), coloured
    by verdict (:data:`COLORS`); a claim with several runs on a model splits its cell into strips."""
    cells = verdict_cells(frame)
    order = list(dict.fromkeys(cells["claim_label"]))
    rows = claim_rows(order).set_index("claim_label")
    strips = cells.groupby(["claim_label", "model"])["entry"].transform("max") + 1
    top = cells["claim_label"].map(rows["top"]) + GAP_PX / 2
    inner = cells["claim_label"].map(rows["height"]) - GAP_PX
    cells = cells.assign(y_top=top + inner * cells["entry"] / strips,
                         y_bottom=top + inner * (cells["entry"] + 1) / strips)
    firsts, lines = [float(m) for m in rows["first"]], list(rows["lines"])
    total = int(rows["height"].sum())
    labels = f"{json.dumps(lines)}[indexof({json.dumps(firsts)}, datum.value)]"  # the label's lines
    models = list(dict.fromkeys(cells["model"]))
    shown = [s for s in STATUSES if s in set(cells["verdict"])]  # a legend entry only where a cell has it
    base = alt.Chart(cells).encode(
        x=alt.X("model:N", title=None, sort=models,
                axis=alt.Axis(orient="top", labelAngle=0, labelLimit=label_limit(models))),
        y=alt.Y("y_top:Q", title=None, scale=alt.Scale(domain=[0, total], reverse=True, nice=False, zero=False),
                axis=alt.Axis(values=firsts, labelExpr=labels, labelLimit=label_limit(lines), labelOverlap=False,
                              labelBaseline="top", labelLineHeight=LINE_PX, grid=False, ticks=False, domain=False)),
        tooltip=[alt.Tooltip("statement:N", title="claim"), alt.Tooltip("model:N"),
                 alt.Tooltip("verdict:N"), alt.Tooltip("estimate:N", title="estimate (95% interval)"),
                 alt.Tooltip("n_text:N", title="n")])
    rects = base.mark_rect(stroke="#888", strokeWidth=0.5).encode(
        y2="y_bottom:Q",
        color=alt.Color("verdict:N", title="verdict (the mark in each cell says it too)",
                        scale=alt.Scale(domain=shown, range=[COLORS[s] for s in shown]),
                        legend=alt.Legend(orient="bottom", columns=1, labelExpr=_legend_marks(shown))))
    text = base.transform_calculate(y_mid="(datum.y_top + datum.y_bottom) / 2").mark_text(
        align="left", dx=4, baseline="middle", fontSize=10, color="#111", limit=CELL_PX - 8).encode(
        x=alt.X("model:N", sort=models, bandPosition=0, axis=None), y=alt.Y("y_mid:Q", axis=None),
        text="cell_text:N")
    return (rects + text).resolve_axis(x="independent", y="independent").properties(title="Every claim's verdict and estimate on every model",
                                     width="container", height=total)


def _legend_marks(shown) -> str:
    """The legend's labels with each verdict's mark: "● holds"."""
    return f"{json.dumps({s: f'{MARKS[s]} {s}' for s in shown}, ensure_ascii=False)}[datum.label]"


__all__ = ["COLORS", "MARKS", "claim_rows", "fig_verdicts", "short_estimate", "verdict_cells"]
