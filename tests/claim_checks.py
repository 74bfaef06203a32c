"""Helpers the chapters' claim tests share: a bootstrap replicate written out with pandas (the rows of
the clusters it drew, each as many times as drawn), and the three outcomes of a rule rendered."""

from __future__ import annotations

import numpy as np
import pandas as pd

from selfrepair.claims import Verdict, anchor, render
from selfrepair.uncertainty import Estimate

PHRASES = {"holds": "holds when", "differs": "differs when", "cannot tell": "cannot tell when"}


def resampled(frame: pd.DataFrame, cluster_of_row, weights, clusters=None) -> pd.DataFrame:
    """The rows of ``frame`` (column ``row``) of each cluster, repeated as often as a replicate's
    ``weights`` drew it; ``clusters`` maps a weight's position to a cluster index (default: the
    position itself, e.g. the test half's clusters)."""
    ids = np.arange(len(weights)) if clusters is None else np.asarray(clusters)
    of = np.asarray(cluster_of_row)[frame["row"].to_numpy()]
    parts = [frame[of == c] for c, w in zip(ids, np.asarray(weights).astype(int)) for _ in range(w)]
    return pd.concat(parts) if parts else frame.iloc[:0]


def intervals(rule) -> dict[str, tuple[float, float]]:
    """An interval for each outcome of ``rule`` (not ``proportional``): wholly on the paper's side,
    wholly on the other, straddling the threshold."""
    b = rule.bounds
    d = max(abs(b[0]), 0.01) * 0.1
    if rule.op == "between":
        return {"holds": (b[0] + d, b[1] - d), "differs": (b[1] + d, b[1] + 2 * d), "cannot tell": (b[0] - d, b[0] + d)}
    up = rule.op in (">", ">=")
    inside, outside = (b[0] + d, b[0] + 2 * d), (b[0] - 2 * d, b[0] - d)
    return {"holds": inside if up else outside, "differs": outside if up else inside,
            "cannot tell": (b[0] - d, b[0] + d)}


def estimate(lo: float, hi: float, n: int = 12) -> Estimate:
    return Estimate((lo + hi) / 2, lo, hi, n, "heads", 40, "documents", 3, 200)


def check_outcomes(claim) -> None:
    """Every outcome of ``claim``'s rule is printed with its word, and the rule's text names exactly
    those outcomes (holds, differs, cannot tell; a line's slope and intercept for ``proportional``)."""
    if claim.rule.op == "proportional":
        cases = {"holds": ((0.5, 0.9), (-0.05, 0.05)), "differs": ((-0.4, -0.1), (-0.05, 0.05)),
                 "cannot tell": ((0.5, 0.9), (-0.05, 0.4))}
        verdicts = {w: Verdict.linear(claim, estimate(*s), estimate(*i)) for w, (s, i) in cases.items()}
    else:
        verdicts = {w: Verdict.of(claim, estimate(*iv)) for w, iv in intervals(claim.rule).items()}
    for word, v in verdicts.items():
        line = render([v])
        assert v.word == word, (claim.key, word, v.lo, v.hi)
        assert line.startswith(f'- <span id="{anchor(claim)}"></span>*{claim.statement}* ({claim.source}): '
                               f"**{word}**."), claim.key
        rule = line[line.index("<details>"):]
        assert set(v.outcomes) == {"holds", "differs", "cannot tell"}, claim.key
        for outcome, phrase in PHRASES.items():
            assert (phrase in rule) == (outcome in v.outcomes), (claim.key, outcome)
        assert f"“{claim.rule.word}”" in rule and claim.rule.reason in rule, claim.key
