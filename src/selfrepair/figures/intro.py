"""Figure for chapter 00, "Introduction": eq. 2's terms next to eq. 1's self-repair.

Pure function: the per-head table of :func:`selfrepair.chapters.intro.closure_table` in, Altair chart out.
"""

from __future__ import annotations

import altair as alt
import pandas as pd

from .legible import DARK

TERMS = {"from_heads": "later heads", "from_mlps": "later MLPs", "from_norm": "final norm",
         "from_block_norms": "block norms (sandwich)"}
TERM_COLORS = [DARK["blue"], DARK["dark orange"], DARK["green"], DARK["purple"]]  # 3:1 on white


def fig_decomposition(table: pd.DataFrame) -> alt.LayerChart:
    """Per ablated head, eq. 2's terms (mean over tokens) stacked as bars — positive ones right of
    zero, negative ones left — and eq. 1's self-repair as a black tick: where eq. 2 closes, the
    tick sits at the bars' net sum (the tooltip shows the largest per-token gap)."""
    order = list(table["label"])
    long = table.melt(id_vars=["label"], value_vars=list(TERMS), var_name="term", value_name="value")
    long["term"] = long["term"].map(TERMS)
    y = alt.Y("label:N", sort=order, title="ablated head")
    bars = alt.Chart(long).mark_bar(height={"band": 0.6}).encode(
        y=y, x=alt.X("value:Q", stack="zero", title="mean over tokens (logits)"),
        color=alt.Color("term:N", scale=alt.Scale(domain=list(TERMS.values()), range=TERM_COLORS),
                        title="eq. 2 term", legend=alt.Legend(orient="bottom", columns=2)),
        tooltip=[alt.Tooltip("label:N", title="head"), alt.Tooltip("term:N", title="term"),
                 alt.Tooltip("value:Q", format=".4f", title="mean (logits)")])
    tick = alt.Chart(table).mark_tick(color="black", thickness=3, size=26).encode(
        y=y, x=alt.X("self_repair:Q"),
        tooltip=[alt.Tooltip("label:N", title="head"),
                 alt.Tooltip("self_repair:Q", format=".4f", title="self-repair (eq. 1)"),
                 alt.Tooltip("delta_logit:Q", format=".4f", title="Δlogit"),
                 alt.Tooltip("delta_direct_effect:Q", format=".4f", title="ΔDE of the head"),
                 alt.Tooltip("eq2_gap:Q", format=".1e", title="largest per-token gap")])
    zero = alt.Chart(pd.DataFrame({"x": [0.0]})).mark_rule(color="#888").encode(x="x:Q")
    return alt.layer(zero, bars, tick).properties(
        width="container", height=alt.Step(34),
        title="Eq. 2's terms (bars) add up to eq. 1's self-repair (black tick)")
