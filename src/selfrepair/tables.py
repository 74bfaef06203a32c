"""Tables the book shows: a paper's table, not a DataFrame dump.

:func:`table` (or a :class:`Layout`, the same choices kept as data by a chapter module) turns a
frame into a :class:`Table`, which a notebook displays as HTML:

- only the columns the text discusses, in that order, under readable headers (:data:`NAMES`, or
  the column name with spaces), each with the frame's column name in small type below it, since
  the prose and the library name columns that way;
- numbers to ``digits`` significant digits in fixed-point notation (``7.53``, ``0.0458``, ``1,234``),
  scientific notation (``2.2×10⁻⁷``) only outside ``[1e-4, 1e6)``; integers whole, with thousands
  separators; shares listed in ``percent`` as percentages (``0.9066`` -> ``90.7%``); missing
  values as ``—``; booleans as yes / no;
- the whole frame (every column, same formatting) one click away in a ``<details>`` element
  below the table, scrolling inside its own box when wider than the page.

The frame itself is untouched (``Table.frame``): code, figures and claims keep using it.
"""

from __future__ import annotations

import html
import math
import numbers
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from .errors import InputError

TABLE_CLASS = "selfrepair-table"  # the browser test looks for it
ORDINARY = (1e-4, 1e6)  # |value| in this range is written in fixed-point notation
MISSING = "—"

NAMES = {  # readable headers for the library's canonical columns (others: underscores to spaces)
    "label": "head", "direct_effect": "DE", "delta_logit": "Δlogit",
    "delta_direct_effect": "ΔDE (head)", "self_repair": "self-repair",
    "from_heads": "later heads", "from_mlps": "later MLPs", "from_norm": "final norm",
    "from_block_norms": "block norms", "eq2_gap": "largest eq. 2 gap",
    "after_ablation": "DE after ablation", "n": "tokens", "n_heads": "heads",
    "stands_for": "stands for (paper)", "reason": "why this head", "paper": "paper's head",
    "parallel_residual": "parallel", "last_layer": "last layer",
}


def format_number(value, digits: int = 3, percent: bool = False) -> str:
    """``value`` as a table shows it (see the module docstring); raises on ``digits < 1``."""
    if digits < 1:
        raise InputError(f"digits must be at least 1, got {digits}")
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return MISSING
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if not isinstance(value, numbers.Real):
        return str(value)
    if percent:
        return f"{float(value) * 100:.1f}%"
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    v = float(value)
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    if v == 0:
        return "0"
    if not ORDINARY[0] <= abs(v) < ORDINARY[1]:
        mantissa, exponent = f"{v:.{digits - 1}e}".split("e")
        text = f"{mantissa}×10{_superscript(int(exponent))}"
    else:
        rounded = float(f"{v:.{digits - 1}e}")  # 0.99999 -> 1.00, not 1.000
        decimals = max(digits - 1 - math.floor(math.log10(abs(rounded))), 0)
        text = f"{v:,.{decimals}f}"
    return "−" + text[1:] if text.startswith("-") else text  # a minus sign, not a hyphen


def _superscript(n: int) -> str:
    return str(n).translate(str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹"))


def _breakable(name: str) -> str:
    """A column name that may wrap after its underscores (``delta_direct_<wbr>effect``)."""
    return html.escape(name).replace("_", "_<wbr>")


def parse_number(text: str) -> float:
    """The number a formatted cell shows (the inverse of :func:`format_number` up to rounding)."""
    t = text.replace(",", "").replace("−", "-")
    if t == MISSING:
        return math.nan
    if t.endswith("%"):
        return float(t[:-1]) / 100
    if "×10" in t:
        mantissa, exponent = t.split("×10")
        exponent = exponent.translate(str.maketrans("⁻⁰¹²³⁴⁵⁶⁷⁸⁹", "-0123456789"))
        return float(mantissa) * 10 ** int(exponent)
    return float(t)


@dataclass(frozen=True)
class Table:
    """A frame and how to show it; ``_repr_html_`` is what the book renders."""

    frame: pd.DataFrame
    columns: tuple[str, ...]
    names: Mapping[str, str] = field(default_factory=dict)
    percent: tuple[str, ...] = ()
    digits: int = 3
    caption: str | None = None

    def header(self, column: str) -> str:
        return self.names.get(column) or NAMES.get(column) or column.replace("_", " ")

    def cells(self, columns: Sequence[str] | None = None) -> list[list[str]]:
        """The shown text of each row (``columns``: default the table's)."""
        cols = list(columns or self.columns)
        return [[format_number(row[c], self.digits, c in self.percent) for c in cols]
                for _, row in self.frame[cols].iterrows()]

    def shown(self) -> pd.DataFrame:
        """The table as text, under its readable headers."""
        return pd.DataFrame(self.cells(), columns=[self.header(c) for c in self.columns])

    def _html(self, columns: Sequence[str], readable: bool) -> str:
        numeric = [pd.api.types.is_numeric_dtype(self.frame[c]) and not pd.api.types.is_bool_dtype(self.frame[c])
                   for c in columns]
        head = "".join(
            f'<th class="{"num" if num else "text"}" title="{html.escape(c)}">'
            + (f'{html.escape(self.header(c))}<span class="column-name">{_breakable(c)}</span>'
               if readable and self.header(c) not in (c, "") else html.escape(self.header(c) if readable else c))
            + "</th>"
            for c, num in zip(columns, numeric))
        body = "".join("<tr>" + "".join(f'<td class="{"num" if num else "text"}">{html.escape(v)}</td>'
                                        for v, num in zip(row, numeric)) + "</tr>"
                       for row in self.cells(columns))
        caption = f"<caption>{html.escape(self.caption)}</caption>" if self.caption and readable else ""
        return f'<table class="{TABLE_CLASS}">{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'

    def _repr_html_(self) -> str:
        every = list(self.frame.columns)
        hidden = len(every) - len(self.columns)
        summary = (f"All {len(every)} columns ({hidden} more than above)" if hidden
                   else f"All {len(every)} columns, under the frame's names")
        return (f'<div class="{TABLE_CLASS}-box">{self._html(self.columns, True)}'
                f'<details class="{TABLE_CLASS}-all"><summary>{summary}</summary>'
                f'<div class="{TABLE_CLASS}-scroll">{self._html(every, False)}</div></details></div>')

    def __repr__(self) -> str:
        return self.shown().to_string(index=False)


def table(frame: pd.DataFrame | pd.Series, columns: Sequence[str] | None = None, *,
          names: Mapping[str, str] | None = None, percent: Sequence[str] = (), digits: int = 3,
          optional: Sequence[str] = (), caption: str | None = None) -> Table:
    """A :class:`Table` of ``frame`` showing ``columns`` (default: all). Columns in ``optional``
    are shown only where some value is non-zero (``from_block_norms`` on a model without block
    norms). A Series becomes a two-column table (its index, then its values)."""
    if isinstance(frame, pd.Series):
        frame = frame.rename_axis(frame.index.name or "item").reset_index(name=frame.name or "value")
    cols = list(frame.columns if columns is None else columns)
    missing = [c for c in [*cols, *percent] if c not in frame.columns]
    if missing:
        raise InputError(f"table: no column {', '.join(map(repr, missing))} in the frame; it has "
                         f"{', '.join(map(str, frame.columns))}")
    cols = [c for c in cols if c not in optional or (frame[c].fillna(0) != 0).any()]
    return Table(frame, tuple(cols), dict(names or {}), tuple(percent), digits, caption)


@dataclass(frozen=True)
class Layout:
    """The columns (and headers, percentages) a chapter shows of one of its frames; call it on
    the frame to get the :class:`Table`."""

    columns: tuple[str, ...]
    percent: tuple[str, ...] = ()
    names: Mapping[str, str] = field(default_factory=dict)
    optional: tuple[str, ...] = ()
    digits: int = 3

    def __call__(self, frame: pd.DataFrame) -> Table:
        return table(frame, self.columns, names=self.names, percent=self.percent,
                     digits=self.digits, optional=self.optional)


__all__ = ["Layout", "NAMES", "TABLE_CLASS", "Table", "format_number", "parse_number", "table"]
