"""What makes a chart read at a glance, shared by the chapter figure modules (and checked by the
tests against the specs they build):

- **contrast** — :func:`contrast` is WCAG's contrast ratio of a colour against the white page;
  every mark a chart draws reaches :data:`MIN_CONTRAST` (3:1, WCAG's minimum for graphics), also
  after its opacity (:func:`blend`). :data:`DARK` lists the book's palette (the theme's
  ``tableau10``) that does, and :func:`signed_color` is a diverging colour for signed values on
  points and bars — dark red, grey at 0, dark blue, interpolated in Lab, so no shade is near-white
  (Vega's ``redblue`` is white at 0: a mark at 0 vanishes); :data:`DEPTH_SCHEME` is the colour of
  depth (a layer, a relative depth) in every chapter: viridis cut at its middle (dark purple early,
  teal late; its yellow end is near-white), read on marks at least :data:`MARK_OPACITY` opaque,
  and :func:`scheme_color` is the shade Vega draws at a point of it;
- **outliers** — :func:`central_range` fits an axis to the values near their median and
  :func:`beyond` / :func:`beyond_note` draw the values past it at the axis's edge and say how many
  (the scale clamps them: nothing is dropped, the tooltip keeps each value);
- **labels** — :func:`text_px` estimates a label's width, :func:`label_limit` sizes an axis's or a
  legend's ``labelLimit`` so that no label is cut, :func:`wrap` breaks a long label into lines and
  :func:`lines_expr` prints them (a ``labelExpr`` returning an array draws one line per entry).
"""

from __future__ import annotations

import json
import textwrap

import altair as alt
import numpy as np

MIN_CONTRAST = 3.0  # WCAG 2.1 (1.4.11): graphical objects need 3:1 against what is next to them
WHITE = "#ffffff"
# the theme's tableau10 colours that reach 3:1 on white (its orange, teal, yellow, pink and light grey
# do not), with a darker orange, grey, green (was #54a24b) and purple (was #b279a2)
DARK = {"blue": "#4c78a8", "red": "#e45756", "green": "#3a8a33", "purple": "#9d5b8f", "brown": "#9d755d",
        "dark orange": "#c85200", "grey": "#767676"}
SIGNED = ("#b2182b", "#767676", "#2166ac")  # negative, 0, positive: every shade between reads on white
MARK_OPACITY = 0.85  # the most see-through a mark may be drawn in DARK's colours or in DEPTH_SCHEME and
# still reach 3:1 (overlaps still show)
# Vega's viridis (vega-scale 6: 31 stops, interpolated in RGB), to tell which of its shades read on white
VIRIDIS = ("440154470e61481a6c482575472f7d443a834144873d4e8a39568c35608d31688e2d708e2a788e27818e23888e21918d"
           "1f988b1fa08822a8842ab07f35b77943bf7154c56866cc5d7ad1518fd744a5db36bcdf27d2e21be9e51afde725")
DEPTH_SCHEME = {"name": "viridis", "extent": [0, 0.5]}  # its shade at 0.5 reaches 3:1 at MARK_OPACITY
FONT_PX = 11  # the theme's label size
CHAR_EM = 0.62  # a generous average character width, in ems, of the theme's sans-serif fonts


def _channels(color: str) -> tuple[float, float, float]:
    c = color.lstrip("#")
    if len(c) == 3:
        c = "".join(ch * 2 for ch in c)
    return tuple(int(c[i:i + 2], 16) / 255 for i in (0, 2, 4))


def luminance(color: str) -> float:
    """WCAG relative luminance of a ``#rrggbb`` colour."""
    lin = [v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4 for v in _channels(color)]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def contrast(color: str, background: str = WHITE) -> float:
    """WCAG contrast ratio (1 to 21) of ``color`` against ``background``."""
    a, b = sorted((luminance(color), luminance(background)), reverse=True)
    return (a + 0.05) / (b + 0.05)


def blend(color: str, opacity: float, background: str = WHITE) -> str:
    """The colour a mark of ``color`` drawn at ``opacity`` shows on ``background``."""
    mixed = [opacity * c + (1 - opacity) * b for c, b in zip(_channels(color), _channels(background))]
    return "#" + "".join(f"{round(255 * v):02x}" for v in mixed)


def scheme_color(t: float, stops: str = VIRIDIS) -> str:
    """The colour Vega draws at ``t`` (0 to 1) of a scheme given as its stops (``stops``: 6 hex
    digits each, interpolated piecewise in RGB, as vega-scale does)."""
    rgb = [[int(stops[i + k:i + k + 2], 16) for k in (0, 2, 4)] for i in range(0, len(stops), 6)]
    x = min(max(t, 0.0), 1.0) * (len(rgb) - 1)
    i = min(int(x), len(rgb) - 2)
    return "#" + "".join(f"{round(a + (b - a) * (x - i)):02x}" for a, b in zip(rgb[i], rgb[i + 1]))


def signed_color(field: str, values, *, title: str | None = None, legend: alt.Legend | None = None) -> alt.Color:
    """A diverging colour for a signed quantity on points or bars (:data:`SIGNED`): symmetric
    about 0 (the same shade for the same size either way), grey at 0, never near-white."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    m = float(np.abs(x).max()) if len(x) and np.abs(x).max() > 0 else 1.0
    kw = {"legend": legend} if legend is not None else {}
    return alt.Color(f"{field}:Q", scale=alt.Scale(domain=[-m, 0, m], range=list(SIGNED), interpolate="lab"),
                     title=title or field.replace("_", " "), **kw)


NAMED = {"black": "#000000", "white": "#ffffff", "gray": "#808080", "grey": "#808080", "red": "#ff0000",
         "steelblue": "#4682b4", "darkgray": "#a9a9a9", "dimgray": "#696969"}
BANDS = ("area",)  # fills behind other marks (interval bands): not the only mark of a value


def _hex(color) -> str | None:
    if not isinstance(color, str):
        return None
    color = NAMED.get(color.lower(), color)
    return color if color.startswith("#") else None


def _scheme_ok(scheme) -> bool:
    """A scheme whose every shade reads on white: viridis cut no further than :data:`DEPTH_SCHEME`."""
    name = scheme.get("name") if isinstance(scheme, dict) else scheme
    extent = scheme.get("extent", [0, 1]) if isinstance(scheme, dict) else [0, 1]
    return name == "viridis" and max(extent) <= DEPTH_SCHEME["extent"][1]


def _channel_colors(enc: dict, where: str, heat: bool = False) -> tuple[list[str], list[str]]:
    """The literal colours a colour channel draws with, and why it fails (an unreadable scheme).
    ``heat``: a heat map's cells (rects coloured by a quantity), whose lightest shade is the value
    nearest 0 — nothing to see there is what it says — so its scheme is not checked."""
    colors, bad = [], []
    if "condition" in enc:
        cond = enc["condition"] if isinstance(enc["condition"], dict) else {}
        more, why = _channel_colors(cond, where, heat)
        colors += more
        bad += why
        if "param" in cond:  # the value outside a selection is greyed on purpose: not a data mark
            return colors, bad
    if "value" in enc:
        colors.append(enc["value"])
    elif "field" in enc:
        scale = enc.get("scale") or {}
        if heat and enc.get("type") == "quantitative":  # its lightest shade (near 0) may fade into the page
            pass
        elif isinstance(scale.get("range"), list):
            colors += [c for c in scale["range"] if isinstance(c, str)]
        elif "scheme" in scale:
            if not _scheme_ok(scale["scheme"]):
                bad.append(f"{where}: scheme {scale['scheme']!r} has shades below 3:1 on white")
        elif enc.get("type") in ("quantitative", "ordinal", "temporal"):
            bad.append(f"{where}: Vega's default ramp for {enc['field']!r} starts near white")
    return colors, bad


EMPTY = 1.25  # a fill this near white inside a readable outline is an empty cell (no verdict, nothing drawn)
POINTS = ("point", "circle", "square", "tick")  # Vega-Lite draws these at opacity 0.7 unless aggregated


def _opacity(mark: dict, enc: dict) -> float:
    """The opacity Vega-Lite draws ``mark`` with: the encoding's value, the mark's, or its default."""
    if isinstance(enc.get("opacity"), dict) and "value" in enc["opacity"]:
        return float(enc["opacity"]["value"])
    if "opacity" in mark:
        return float(mark["opacity"])
    aggregated = any(isinstance(e, dict) and "aggregate" in e for e in enc.values())
    return 0.7 if mark.get("type") in POINTS and not aggregated else 1.0


def _mark_problems(mark: dict, enc: dict, where: str) -> list[str]:
    """:func:`pale_marks` for one mark with its (inherited) encoding."""
    opacity, out = _opacity(mark, enc), []
    outline = _hex(mark.get("stroke")) if mark.get("strokeWidth", 1) > 0 else None
    gap = outline is not None and contrast(outline) < 1.1  # a white outline: a gap between marks
    readable = outline is not None and not gap and contrast(blend(outline, opacity)) >= MIN_CONTRAST
    field = (enc.get("color") or enc.get("fill") or {}).get("field")
    same = field is not None and (enc.get("stroke") or {}).get("field") == field  # the outline draws it too
    for ch in ("color", "fill", "stroke"):
        fill = ch != "stroke"
        if (not fill and gap) or (fill and same):
            continue
        colors = [mark[ch]] if ch in mark and ch not in enc else []
        if isinstance(enc.get(ch), dict):
            more, bad = _channel_colors(enc[ch], where, heat=mark.get("type") == "rect")
            colors, out = colors + more, out + bad
        alpha = opacity * float(mark.get("fillOpacity" if fill else "strokeOpacity", 1))
        for c in colors:
            h = _hex(c)
            if c is None or c == "transparent":
                continue  # nothing drawn
            if h is None:
                out.append(f"{where}: colour {c!r} not checked (give it as #rrggbb)")
            elif fill and readable and contrast(h) < EMPTY:
                continue  # an empty cell inside its outline
            elif contrast(blend(h, alpha)) < MIN_CONTRAST:
                out.append(f"{where}: {c} at opacity {alpha:g} is {contrast(blend(h, alpha)):.1f}:1 on white")
    return out


def pale_marks(spec: dict, path: str = "chart", inherited: dict | None = None) -> list[str]:
    """Every mark of a Vega-Lite ``spec`` drawn below :data:`MIN_CONTRAST` on white after its
    opacity (Vega-Lite's default for points included; a colour, a colour scale's range or
    scheme), as readable messages. Exempt: fills drawn behind other marks (:data:`BANDS`), the grey
    of marks outside a selection, a fill whose outline draws the same field, a near-white fill
    inside a readable outline (an empty cell, :data:`EMPTY`), a white outline (a gap between
    marks) and a heat map's scale (:func:`_channel_colors`). A nominal colour without a range
    takes the theme's category range (:data:`DARK`)."""
    out = []
    enc = {**(inherited or {}), **(spec.get("encoding") or {})}
    if "mark" in spec:
        mark = spec["mark"] if isinstance(spec["mark"], dict) else {"type": spec["mark"]}
        if mark.get("type") not in BANDS:
            out += _mark_problems(mark, enc, f"{path} ({mark.get('type')})")
    for key in ("layer", "hconcat", "vconcat", "concat"):
        for i, sub in enumerate(spec.get(key) or []):
            out += pale_marks(sub, f"{path}.{key}[{i}]", enc)
    if isinstance(spec.get("spec"), dict):
        out += pale_marks(spec["spec"], f"{path}.spec", enc)
    return out


def data_domain(values, include=(), pad: float = 0.05) -> list[float]:
    """An axis domain computed from the data: the finite ``values`` and ``include`` (reference
    lines the axis must show), widened by ``pad`` of their span on each side (never a typed range;
    ``[v - 0.5, v + 0.5]`` when they are all one value ``v``)."""
    x = np.asarray(values, dtype=float)
    x = np.concatenate([x[np.isfinite(x)], np.asarray(include, dtype=float)])
    if not len(x):
        return [0.0, 1.0]
    lo, hi = float(x.min()), float(x.max())
    margin = pad * (hi - lo) if hi > lo else 0.5
    return [lo - margin, hi + margin]


def central_range(values, *, k: float = 5.0, include=(), pad: float = 0.08) -> tuple[float, float] | None:
    """An axis range for ``values`` without their outliers: the span of the values within ``k``
    robust standard deviations of their median (1.4826 × the median absolute deviation: it holds
    however far the outliers lie, up to half of the values — a noise ablation's whole series) and
    of ``include`` (reference lines the axis must show), padded by ``pad`` of it; ``None`` when no
    value lies beyond (the axis then spans every value, as Vega-Lite draws it)."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) < 4:
        return None
    mid = np.median(x)
    spread = 1.4826 * np.median(np.abs(x - mid)) or np.subtract(*np.quantile(x, [0.95, 0.05])) / 3.29
    if spread <= 0:
        return None
    inside = x[np.abs(x - mid) <= k * spread]
    if len(inside) == len(x):
        return None
    lo, hi = min([inside.min(), *include]), max([inside.max(), *include])
    margin = pad * (hi - lo) if hi > lo else 0.5
    return float(lo - margin), float(hi + margin)


def beyond(values, span: tuple[float, float] | None):
    """Per value: ``"above"`` / ``"below"`` the axis ``span`` (drawn at its edge), else ``""``."""
    x = np.asarray(values, dtype=float)
    if span is None:
        return np.full(len(x), "", dtype=object)
    return np.where(x > span[1], "above", np.where(x < span[0], "below", "")).astype(object)


def beyond_note(flags, series=None, what: str = "values") -> str:
    """The subtitle of a chart whose axis clips outliers: how many (per series, where given) are
    drawn at the axis's edge, and where to read them."""
    flags = np.asarray(flags, dtype=object)
    n = int((flags != "").sum())
    if not n:
        return ""
    per = ""
    if series is not None:
        s = np.asarray(series, dtype=object)[flags != ""]
        names, counts = np.unique(s.astype(str), return_counts=True)
        per = " (" + ", ".join(f"{a}: {c}" for a, c in zip(names, counts)) + ")"
    arrows = "/".join(a for a, side in (("▲", "above"), ("▼", "below")) if (flags == side).any())
    return f"{n} of {len(flags)} {what}{per} lie beyond the axis: drawn as {arrows} at its edge (hover for each value)"


def clamped(span: tuple[float, float] | None, **scale) -> alt.Scale:
    """A scale over ``span`` (:func:`central_range`) that draws the values beyond it at its edge
    (``clamp``), or Vega-Lite's own scale when ``span`` is ``None``."""
    if span is None:
        return alt.Scale(**scale)
    return alt.Scale(domain=list(span), clamp=True, nice=False, zero=False, **scale)


def beyond_marks(base: alt.Chart, x, y, **encoding) -> alt.Chart:
    """Triangles at the axis's edge for the rows whose ``beyond`` column is set (▲ above, ▼ below),
    on the clamped ``y`` (its scale: :func:`clamped`); ``encoding``: colour, tooltip."""
    shape = alt.Shape("beyond:N", scale=alt.Scale(domain=["above", "below"], range=["triangle-up", "triangle-down"]),
                      legend=None)
    return (base.transform_filter("datum.beyond != ''").mark_point(filled=True, size=90, opacity=1, stroke="#222", strokeWidth=1)
            .encode(x=x, y=y, shape=shape, **encoding))


def text_px(text: str, font_px: float = FONT_PX) -> float:
    """A generous estimate of ``text``'s width in pixels at ``font_px`` (sans-serif)."""
    return CHAR_EM * font_px * len(str(text))


def label_limit(labels, font_px: float = FONT_PX, minimum: int = 160) -> int:
    """A ``labelLimit`` (px) no label of ``labels`` (strings, or lists of lines) is cut at."""
    lines = [line for lab in labels for line in (lab if isinstance(lab, (list, tuple)) else [lab])]
    return int(max([minimum] + [np.ceil(text_px(line, font_px)) + 4 for line in lines]))


def wrap(text: str, chars: int) -> list[str]:
    """``text`` as lines of at most ``chars`` characters (a longer word keeps its own line)."""
    return textwrap.wrap(str(text), chars, break_long_words=False, break_on_hyphens=False) or [""]


def lines_expr(labels, chars: int) -> str:
    """A ``labelExpr`` printing each of ``labels`` (the axis's values) on lines of at most ``chars``
    characters; a value not in ``labels`` prints as it is."""
    labels = [str(x) for x in labels]
    return (f"indexof({json.dumps(labels)}, datum.label) >= 0 ? "
            f"{json.dumps([wrap(x, chars) for x in labels])}[indexof({json.dumps(labels)}, datum.label)] "
            ": datum.label")


__all__ = ["CHAR_EM", "DARK", "DEPTH_SCHEME", "FONT_PX", "MARK_OPACITY", "MIN_CONTRAST", "SIGNED", "VIRIDIS", "beyond",
           "pale_marks",
           "beyond_marks", "beyond_note", "blend", "central_range", "clamped", "contrast", "label_limit", "lines_expr",
           "luminance", "scheme_color", "signed_color", "text_px", "wrap"]
