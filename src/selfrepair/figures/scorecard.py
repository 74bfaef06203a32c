"""Figure for chapter 09, the scorecard: every claim's verdict on every model at a glance.

A pure function of the scorecard's frame (:func:`selfrepair.scorecard.build`, one row per claim,
model and verdict): one cell per claim (rows, in the book's order) and model (columns), coloured
by the verdict; a claim decided on several runs of one model (chapter 6) splits its cell into one
strip per run. The tooltip carries the estimate with its interval and n.
"""

from __future__ import annotations

import altair as alt
import pandas as pd

from ..scorecard import STATUSES

COLORS = {"holds": "#2e7d32", "differs": "#c62828", "cannot tell": "#bdbdbd", "not tested": "#eeeeee",
          "rule changed": "#f9a825", "not run": "#ffffff"}
ROW_PX = 18  # height of one claim's row


def verdict_cells(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: ``claim_label`` ("NN · statement"), ``model``, ``verdict`` and the text
    the tooltip shows; the order of the claims is the book's."""
    out = frame[["chapter", "claim", "statement", "model", "verdict", "estimate", "n", "unit"]].copy()
    out["claim_label"] = out["chapter"] + " · " + out["statement"]
    out["entry"] = out.groupby(["claim_label", "model"]).cumcount()  # the run, where a model has several
    out["n_text"] = [("" if n is None or pd.isna(n) else f"{int(n):,} {u}") for n, u in zip(out["n"], out["unit"])]
    return out.drop(columns=["n", "unit"])


def fig_verdicts(frame: pd.DataFrame) -> alt.Chart:
    """Claims (rows) by model (columns), coloured by verdict (:data:`COLORS`)."""
    cells = verdict_cells(frame)
    order = list(dict.fromkeys(cells["claim_label"]))
    shown = [s for s in STATUSES if s in set(cells["verdict"])]  # a legend entry only where a cell has it
    return alt.Chart(cells).mark_rect(stroke="#888", strokeWidth=0.5).encode(
        x=alt.X("model:N", title=None, sort=list(dict.fromkeys(cells["model"])),
                axis=alt.Axis(orient="top", labelAngle=0, labelLimit=160)),
        y=alt.Y("claim_label:N", sort=order, title=None, axis=alt.Axis(labelLimit=200)),
        yOffset=alt.YOffset("entry:O"),
        color=alt.Color("verdict:N", title="verdict",
                        scale=alt.Scale(domain=shown, range=[COLORS[s] for s in shown]),
                        legend=alt.Legend(orient="bottom", columns=1)),  # fits beside the labels on a phone
        tooltip=[alt.Tooltip("statement:N", title="claim"), alt.Tooltip("model:N"),
                 alt.Tooltip("verdict:N"), alt.Tooltip("estimate:N", title="estimate (95% interval)"),
                 alt.Tooltip("n_text:N", title="n")],
    ).properties(title="Every claim's verdict on every model", width="container",
                 height=ROW_PX * len(order))


__all__ = ["COLORS", "fig_verdicts", "verdict_cells"]
