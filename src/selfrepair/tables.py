"""Tables the book shows: a paper's table, not a DataFrame dump.

:func:`table` (or a :class:`Layout`, the same choices kept as data by a chapter module) turns a
frame into a :class:`Table`, which a notebook displays as HTML:

- only the columns the text discusses, in that order, under one row of readable headers
  (:data:`NAMES`, or the column name with spaces); the frame's column name is the header's
  tooltip, and the header of the full frame below;
- numbers to ``digits`` significant digits in fixed-point notation (``7.53``, ``0.0458``, ``1,234``),
  scientific notation (``2.2×10⁻⁷``) only outside ``[1e-4, 1e6)``; integers whole, with thousands
  separators — an integer column stays integer when other columns are floats, and a float column
  of whole numbers that counts or indexes (:func:`integer_column`: ``layer``, ``head``, ``n_*``...)
  is shown as integers too; shares listed in ``percent`` as percentages (``0.9066`` -> ``90.7%``);
  missing values as ``—``; booleans as yes / no;
- where the table leaves columns out, those columns one click away in a ``<details>`` element below
  the table (after its first column, which row; same formatting, under readable headers:
  :func:`readable`, the frame's name on hover), scrolling inside its own box when wider than the
  page; a fold holds nothing the table shows (``layer`` and ``head`` beside a ``label`` that names
  them are the label's); a table showing every column is shown once;
- on a phone (:data:`PHONE_PX`): a table of many numeric columns shows only its ``phone`` columns,
  the others move into the fold (which a phone then always has; what only a phone shows carries
  the ``hidden`` attribute, which the phone CSS overrides, so a page read without the book's CSS
  — a text dump, a reader view — sees the laptop's table and a fold of only what it leaves out);
  a table of text (``stacked``)
  shows each row as a block of labelled cells. So no table scrolls sideways on a phone, and on
  a laptop every table is the paper's.

:func:`folded` shows a frame as a one-line summary with the whole table one click away (the
provenance cell every chapter ends with); :func:`counted` writes a count with its noun in the
right number ("1 draw", "3 patches"), so no generated sentence says "draw(s)".

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
PHONE_PX = 720  # the widest screen book/_static/selfrepair.css treats as a phone (its @media rules)
WIDE_ONLY, PHONE_ONLY = "wide-only", "phone-only"  # classes the CSS hides on a phone / elsewhere
STACKED = "stacked"  # a table whose rows a phone shows as blocks, each cell under its header
FULL_FRAME = "the rest of the frame, one click away: every computed column the table leaves out"  # why a fold may scroll
ORDINARY = (1e-4, 1e6)  # |value| in this range is written in fixed-point notation
MISSING = "—"

NAMES = {  # readable headers for the library's canonical columns (others: underscores to spaces)
    "label": "head", "direct_effect": "DE", "delta_logit": "Δlogit",
    "delta_direct_effect": "ΔDE (head)", "self_repair": "self-repair",
    "from_heads": "later heads", "from_mlps": "later MLPs", "from_norm": "final norm",
    "from_block_norms": "block norms", "eq2_gap": "largest eq. 2 gap",
    "after_ablation": "DE after ablation", "n": "tokens", "n_heads": "heads",
    "stands_for": "stands for (paper)", "reason": "why this head", "paper": "paper's head",
    "parallel_residual": "parallel", "last_layer": "last layer", "fold_value_biases": "value biases folded",
}
WORDS = {  # a column's name read word by word where NAMES has no header for it (:func:`readable`)
    "de": "DE", "io": "IO", "s": "S", "s1": "S1", "s2": "S2", "attn": "attention", "abs": "absolute",
    "delta": "Δ", "mlp": "MLP", "mlps": "MLPs", "atp": "AtP", "r2": "R²", "top1": "top-1", "top2": "top-2",
    "eq2": "eq. 2", "pct": "%",
}
MINUS = "−"  # the minus sign every table and sentence of the book prints (never the hyphen "-")


def readable(column: str) -> str:
    """A header for a frame's column: :data:`NAMES`, else its words (``n_positive_de`` ->
    "number of positive DE", ``attn_s1`` -> "attention S1", ``fig7_anti_erasure`` -> "Fig 7 anti
    erasure"), never the snake_case name itself (which stays the header's tooltip)."""
    if column in NAMES:
        return NAMES[column]
    words = [WORDS.get(w, f"Fig {w[3:]}" if w[:3] == "fig" and w[3:].isdigit() else w)
             for w in str(column).split("_") if w]
    if len(words) > 1 and words[0] == "n":
        words = ["number", "of", *words[1:]]
    text = " ".join(words).replace("self repair", "self-repair").replace("anti erasure", "anti-erasure").replace("Δ logit", "Δlogit").replace("Δ DE", "ΔDE")
    return text or str(column)


def minus(text: str) -> str:
    """``text`` (a formatted number) with its leading hyphen as the minus sign :data:`MINUS`."""
    return MINUS + text[1:] if text.startswith("-") else text


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
        return minus(f"{float(value) * 100:.1f}%")  # a minus sign, not a hyphen
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    v = float(value)
    if math.isinf(v):
        return "∞" if v > 0 else MINUS + "∞"
    if v == 0:
        return "0"
    if not ORDINARY[0] <= abs(v) < ORDINARY[1]:
        mantissa, exponent = f"{v:.{digits - 1}e}".split("e")
        text = f"{mantissa}×10{_superscript(int(exponent))}"
    else:
        rounded = float(f"{v:.{digits - 1}e}")  # 0.99999 -> 1.00, not 1.000
        decimals = max(digits - 1 - math.floor(math.log10(abs(rounded))), 0)
        text = f"{v:,.{decimals}f}"
    return minus(text)  # a minus sign, not a hyphen


INTEGER_NAMES = {"layer", "head", "neuron", "rank", "row", "pos", "prompt", "n", "count", "tokens",
                 "heads", "layers", "prompts", "rows", "last_layer", "ablated_layer", "readout_layer"}


def integer_column(name: str, values: pd.Series) -> bool:
    """Whether ``values`` are shown as integers: an integer dtype, or a float column whose every
    value is whole (or missing) and whose name counts or indexes something (:data:`INTEGER_NAMES`,
    ``n_*``, ``*_layer``) — a column of means that happen to be whole stays a float column."""
    if pd.api.types.is_bool_dtype(values) or not pd.api.types.is_numeric_dtype(values):
        return False
    if pd.api.types.is_integer_dtype(values):
        return True
    finite = values.dropna().to_numpy(float)
    return integer_name(name) and bool(np.all(np.isfinite(finite) & (finite == np.round(finite))))


IDENTIFIER_NAMES = {"layer", "head", "neuron", "index", "pos", "prompt", "row"}


def identifier_name(name: str) -> bool:
    """Whether a column of this name holds identifiers (a neuron's index, a layer's number): printed
    as plain integers ("neuron 1026", never "1,026"), as the prose names them — they are no quantity."""
    name = str(name)
    return name in IDENTIFIER_NAMES or name.rsplit("_", 1)[-1] in IDENTIFIER_NAMES


def integer_name(name: str) -> bool:
    """Whether a column of this name counts or indexes something (its values are whole)."""
    return name in INTEGER_NAMES or name.startswith("n_") or name.endswith("_layer") or identifier_name(name)


def counted(n: int, singular: str, plural: str | None = None) -> str:
    """``n`` and its noun in the right number: ``counted(1, "draw")`` -> ``"1 draw"``,
    ``counted(3, "patch", "patches")`` -> ``"3 patches"`` (default plural: ``singular + "s"``)."""
    n = int(n)
    return f"{n:,} {singular if n == 1 else (plural or singular + 's')}"


def listed(items: Sequence, singular: str, plural: str | None = None) -> str:
    """A noun in the right number before its items: ``listed([3], "layer")`` -> ``"layer 3"``,
    ``listed([0, 5, 16], "layer")`` -> ``"layers 0, 5 and 16"``."""
    items = [str(i) for i in items]
    words = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return f"{singular if len(items) == 1 else (plural or singular + 's')} {words}"


def _superscript(n: int) -> str:
    return str(n).translate(str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹"))


def _breakable(text: str) -> str:
    """Text that may wrap after a slash or an underscore (a hub id, a path, a column name:
    ``EleutherAI/<wbr>pythia-70m``, ``delta_<wbr>direct_<wbr>effect``), so a narrow column breaks it
    there rather than mid-word or not at all."""
    return html.escape(text).replace("/", "/<wbr>").replace("_", "_<wbr>")


def scroll_box(inner: str, reason: str = FULL_FRAME) -> str:
    """``inner`` in the box that scrolls it sideways where it is wider than the page (a fold's full
    frame on a phone), saying why it may (``data-scrolls``, which the browser test reads: every
    other table must fit its column)."""
    return f'<div class="{TABLE_CLASS}-scroll" data-scrolls="{html.escape(reason)}">{inner}</div>'


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
    phone: tuple[str, ...] | None = None  # the columns a phone shows (None: every column); the rest fold
    stacked: bool = False  # on a phone each row is a block, each cell labelled with its header

    def header(self, column: str) -> str:
        return self.names.get(column) or readable(column)

    def named(self, column: str) -> bool:
        """Whether ``column`` has a readable header (the table's ``names`` or :data:`NAMES`)."""
        return column in self.names or column in NAMES

    def cells(self, columns: Sequence[str] | None = None) -> list[list[str]]:
        """The shown text of each row (``columns``: default the table's). Column by column, so
        an integer column is never upcast to float by its row's other columns."""
        cols = list(columns or self.columns)
        shown = []
        for c in cols:
            values = self.frame[c]
            if c not in self.percent and integer_column(c, values):
                values = values.astype("Int64")  # whole numbers; missing stays missing
                if identifier_name(c):  # an index, not a quantity: no thousands separator
                    shown.append([MISSING if v is pd.NA else str(int(v)) for v in values.tolist()])
                    continue
            shown.append([format_number(None if v is pd.NA else v, self.digits, c in self.percent)
                          for v in values.tolist()])
        return [list(row) for row in zip(*shown)] if shown else []

    def shown(self) -> pd.DataFrame:
        """The table as text, under its readable headers."""
        return pd.DataFrame(self.cells(), columns=[self.header(c) for c in self.columns])

    def off_phone(self) -> list[str]:
        """The shown columns a phone leaves out (into the fold)."""
        return [] if self.phone is None else [c for c in self.columns if c not in self.phone]

    def _html(self, columns: Sequence[str], readable: bool, only: Mapping[str, str] | None = None) -> str:
        """``only``: a class per column shown at some widths only (:data:`WIDE_ONLY`, :data:`PHONE_ONLY`)."""
        only = only or {}
        numeric = [pd.api.types.is_numeric_dtype(self.frame[c]) and not pd.api.types.is_bool_dtype(self.frame[c])
                   for c in columns]
        kinds = [" ".join(filter(None, ("num" if num else "text", only.get(c)))) for c, num in zip(columns, numeric)]
        labels = [html.escape(self.header(c)) for c in columns]
        hide = {c: " hidden" if only.get(c) == PHONE_ONLY else "" for c in columns}  # a phone's alone
        head = "".join(f'<th class="{kind}" title="{html.escape(c)}"{hide[c]}>{label}</th>'
                       for c, kind, label in zip(columns, kinds, labels))
        stacked = readable and self.stacked  # a phone labels each cell with its header (CSS ::before)
        body = "".join("<tr>" + "".join(f'<td class="{kind}"{hide[c]}' + (f' data-label="{label}"' if stacked else "")
                                        + f">{_breakable(v)}</td>" for v, kind, label, c in zip(row, kinds, labels, columns))
                       + "</tr>" for row in self.cells(columns))
        caption = f"<caption>{html.escape(self.caption)}</caption>" if self.caption and readable else ""
        kind = f"{TABLE_CLASS} {STACKED}" if stacked else TABLE_CLASS
        return f'<table class="{kind}">{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'

    def left_out(self) -> list[str]:
        """The frame's columns the table leaves out, less ``layer`` and ``head`` where the table
        shows a ``label`` that names both on every row (``L3H1``): the fold's columns."""
        out = [c for c in self.frame.columns if c not in self.columns]
        if "label" in self.columns and {"layer", "head"} <= set(out):
            f = self.frame
            named = [f"L{l}H{h}" for l, h in zip(f["layer"], f["head"])] == [str(x) for x in f["label"]]
            out = [c for c in out if not (named and c in ("layer", "head"))]
        return out

    def _repr_html_(self) -> str:
        # the fold adds only what the table above leaves out (:meth:`left_out`): its first column
        # (which row), then those columns, under readable headers (each header's title is the
        # frame's name); every column shown above: the table once. On a phone the columns the table
        # leaves out there come first in the fold (shown there only: ``hidden`` elsewhere).
        hidden = self.left_out()
        narrow = self.off_phone()
        shown = {c: WIDE_ONLY for c in narrow}
        full = ""
        if hidden or narrow:
            n_wide, n_phone = counted(len(hidden), "more column"), counted(len(hidden) + len(narrow), "more column")
            summary = (n_wide if not narrow else f'<span class="{WIDE_ONLY}">{n_wide}</span>'
                       f'<span class="{PHONE_ONLY}" hidden>{n_phone}</span>') if hidden else n_phone
            fold = self._html([self.columns[0], *narrow, *hidden], False, {c: PHONE_ONLY for c in narrow})
            full = (f'<details class="{TABLE_CLASS}-all{"" if hidden else " " + PHONE_ONLY}"'
                    f'{"" if hidden else " hidden"}><summary>{summary} '
                    f'(the rest of the computed values)</summary>'
                    f'{scroll_box(fold)}</details>')
        return f'<div class="{TABLE_CLASS}-box">{self._html(self.columns, True, shown)}{full}</div>'

    def __repr__(self) -> str:
        return self.shown().to_string(index=False)


def table(frame: pd.DataFrame | pd.Series, columns: Sequence[str] | None = None, *,
          names: Mapping[str, str] | None = None, percent: Sequence[str] = (), digits: int = 3,
          optional: Sequence[str] = (), caption: str | None = None, phone: Sequence[str] | None = None,
          stacked: bool = False) -> Table:
    """A :class:`Table` of ``frame`` showing ``columns`` (default: all). Columns in ``optional``
    are shown only where some value is non-zero (``from_block_norms`` on a model without block
    norms). ``phone``: the columns a phone shows (the first column among them), the others one
    click away; ``stacked``: on a phone each row is a block of labelled cells (a table of text).
    A Series becomes a two-column table (its index, then its values)."""
    if isinstance(frame, pd.Series):
        frame = frame.rename_axis(frame.index.name or "item").reset_index(name=frame.name or "value")
    cols = list(frame.columns if columns is None else columns)
    missing = [c for c in [*cols, *percent, *(phone or ())] if c not in frame.columns]
    if missing:
        raise InputError(f"table: no column {', '.join(map(repr, missing))} in the frame; it has "
                         f"{', '.join(map(str, frame.columns))}")
    cols = [c for c in cols if c not in optional or (frame[c].fillna(0) != 0).any()]
    if phone is not None and (not cols or cols[0] not in phone or set(phone) - set(cols) - set(optional)):
        raise InputError(f"table: a phone shows some of the table's columns, its first ({cols[0] if cols else None!r}) "
                         f"among them; got phone={list(phone)} for columns {cols}")
    return Table(frame, tuple(cols), dict(names or {}), tuple(percent), digits, caption,
                 None if phone is None else tuple(c for c in cols if c in phone), stacked)


@dataclass(frozen=True)
class Layout:
    """The columns (and headers, percentages) a chapter shows of one of its frames; call it on
    the frame to get the :class:`Table`."""

    columns: tuple[str, ...]
    percent: tuple[str, ...] = ()
    names: Mapping[str, str] = field(default_factory=dict)
    optional: tuple[str, ...] = ()
    digits: int = 3
    caption: str | None = None  # e.g. which tokens the numbers are over, where a verdict reads others
    phone: tuple[str, ...] | None = None  # the columns a phone shows (None: all); the rest one click away
    stacked: bool = False  # on a phone each row a block of labelled cells (a table of text)

    def __call__(self, frame: pd.DataFrame) -> Table:
        return table(frame, self.columns, names=self.names, percent=self.percent, digits=self.digits,
                     optional=self.optional, caption=self.caption, phone=self.phone, stacked=self.stacked)


@dataclass(frozen=True)
class Folded:
    """A frame shown as a one-line ``summary`` with the whole table one click away (a
    ``<details>`` element); its text form is the frame's (code and tests read it as before)."""

    frame: pd.DataFrame
    summary: str
    label: str = "The whole table"

    def _repr_html_(self) -> str:
        every = table(self.frame)
        return (f'<div class="{TABLE_CLASS}-box"><p class="{TABLE_CLASS}-summary">{html.escape(self.summary)}</p>'
                f'<details class="{TABLE_CLASS}-all"><summary>{html.escape(self.label)}</summary>'
                f'{scroll_box(every._html(every.columns, False))}</details></div>')

    def __repr__(self) -> str:
        return self.frame.to_string()


def folded(frame: pd.DataFrame, summary: str, label: str = "The whole table") -> Folded:
    """``frame`` as :class:`Folded`: ``summary`` in one line, the table behind ``label``."""
    return Folded(frame, summary, label)


__all__ = ["FULL_FRAME", "Folded", "Layout", "MINUS", "NAMES", "PHONE_PX", "TABLE_CLASS", "Table", "counted", "folded",
           "format_number", "identifier_name", "integer_column", "integer_name", "listed", "minus", "parse_number", "readable",
           "scroll_box", "table"]
