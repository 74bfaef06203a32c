"""The script that fits a chart to the book's column in the browser (:data:`FIT_JS`, inlined by
:func:`selfrepair.figures.chart_html` beside every chart), with the widths it works to."""

from __future__ import annotations

NARROWEST_VIEW = 100  # px: the fallback never draws a view narrower than this (two fit a phone)
WIDEN_SLACK = 12  # px: a stacked chart narrower than its column by more than this is widened to fill it
LAYOUTS = ("as designed", "stacked", "stacked, widened", "stacked, narrowed", "narrowed")  # data-layout after drawing

# Fitting a chart to its column, in the browser. Chart titles longer than the column are wrapped onto
# lines before the first drawing (a container-width view otherwise shrinks to make room for a long
# title: to zero width on a phone). Single and layered views need nothing more: the figure
# functions give them width "container" and Vega redraws them at the column's width. Vega-Lite has
# no container width for compound charts (facet, concat), so they are drawn as designed (they fit
# from 1440 px down to 1024 px) and, only when the drawing is wider than its column (a phone), drawn
# again stacked — side-by-side views one under the other, a wrapped facet in one column, a column
# facet as a wrapped one — then, where the stacked views leave room in the column, widened to fill
# it (a grid's 150 px panels one under the other in a 358 px column), or, if still too wide (any
# chart), narrowed: every fixed view width capped at the widest less the excess (and the theme's
# default width reduced by it; never below NARROWEST_VIEW px), discrete
# steps by a quarter, long chart titles wrapped onto lines. `data-layout` on the element says which (LAYOUTS); it is set when the
# last drawing is done. A window resize that changes the column's width fits again.
FIT_JS = """  window.selfrepairFit = window.selfrepairFit || (function () {
    var COMPOUND = ["hconcat", "vconcat", "concat", "facet", "repeat"];
    function copy(s) { return JSON.parse(JSON.stringify(s)); }
    function views(n, f) {  // f(view) for every spec node below n (n included)
      if (!n || typeof n !== "object") return;
      f(n);
      ["hconcat", "vconcat", "concat", "layer"].forEach(function (k) {
        (Array.isArray(n[k]) ? n[k] : []).forEach(function (c) { views(c, f); });
      });
      if (n.spec) views(n.spec, f);
    }
    function stack(spec) {
      var s = copy(spec);
      views(s, function (n) {
        if (Array.isArray(n.hconcat)) { n.vconcat = n.hconcat; delete n.hconcat; }
        if (Array.isArray(n.concat)) n.columns = 1;
        if (n.facet && n.spec) {
          if (n.facet.field !== undefined) n.columns = 1;
          else if (n.facet.column && !n.facet.row) { n.facet = n.facet.column; n.columns = 1; }
        }
      });
      return s;
    }
    function wrap(text, chars) {  // a title as lines of at most `chars` characters
      var lines = [], line = "";
      String(text).split(" ").forEach(function (w) {
        if (line && (line + " " + w).length > chars) { lines.push(line); line = w; }
        else line = line ? line + " " + w : w;
      });
      return line ? lines.concat([line]) : lines;
    }
    function fits(text, chars) {  // a title (a string, or lines already wrapped) within `chars`
      return (Array.isArray(text) ? text : [text]).every(function (l) { return String(l).length <= chars; });
    }
    function lines(text, chars) {
      return fits(text, chars) ? text : wrap(Array.isArray(text) ? text.join(" ") : text, chars);
    }
    function titles(spec, chars) {  // every chart title wider than `chars` characters as lines
      var s = copy(spec);
      views(s, function (n) {
        if (typeof n.title === "string" || Array.isArray(n.title)) n.title = lines(n.title, chars);
        else if (n.title && n.title.text !== undefined) {
          n.title.text = lines(n.title.text, chars);
          if (n.title.subtitle !== undefined) n.title.subtitle = lines(n.title.subtitle, chars);
        }
      });
      return s;
    }
    function widest(spec) {  // the widest fixed view width of a spec (0: none)
      var w = 0;
      views(spec, function (n) { if (typeof n.width === "number") w = Math.max(w, n.width); });
      return w;
    }
    function narrow(spec, by, chars) {
      // views one under the other: the widest sets the chart's width, so every view is capped at
      // the widest less the excess (taking the excess off every view left a narrower one beside
      // it at 100 px: chapter 2's frozen-norm scatter)
      var s = titles(spec, chars), cap = Math.round(widest(spec) - by);
      views(s, function (n) {
        if (typeof n.width === "number" && n.width > Math.max(cap, %(narrowest)d))  // narrower, never wider
          n.width = Math.max(%(narrowest)d, cap);
        else if (n.width && typeof n.width.step === "number")
          n.width = {step: Math.max(4, Math.floor(n.width.step * 0.75))};
      });
      var view = (s.config || {}).view;  // views without a width of their own: the theme's
      if (view && typeof view.continuousWidth === "number" && view.continuousWidth > %(narrowest)d)
        view.continuousWidth = Math.max(%(narrowest)d, Math.round(view.continuousWidth - by));
      return s;
    }
    function widen(spec, by) {  // stacked views with room to spare in the column: each view wider by `by`
      var s = copy(spec);
      views(s, function (n) { if (typeof n.width === "number") n.width = Math.round(n.width + by); });
      return s;
    }
    function excess(el) {
      var d = el.querySelector("svg, canvas");
      return d ? d.getBoundingClientRect().width - el.clientWidth : 0;
    }
    return function (el, spec, opts) {
      var result = null, busy, width = -1;
      function draw(s) {
        if (result) { result.finalize(); result = null; }
        return vegaEmbed(el, s, opts).then(function (r) { result = r; });
      }
      function fit() {
        width = el.clientWidth;
        delete el.dataset.layout;
        var compound = COMPOUND.some(function (k) { return k in spec; }), layout = "as designed";
        // a title wider than the column: Vega would shrink a container-width view to make room
        // for it (to nothing on a phone), so it is wrapped onto lines first (~7 px a character)
        var s = titles(spec, Math.max(20, Math.floor(el.clientWidth / 8))), tries = 0;
        function next() {
          // stacked on a phone, small multiples designed three to a row keep their width in one
          // column (150 px panels in a 358 px column): they are widened to fill it (again, where a
          // panel's header, wider than its plot, took part of the room)
          if (layout.indexOf("stacked") === 0 && layout !== "stacked, narrowed" && excess(el) < -%(slack)d
              && tries <= 5) {
            tries += 1; s = widen(s, -excess(el) - 4); layout = "stacked, widened";
            return draw(s).then(next);
          }
          if (excess(el) <= 2 || tries > 5) { el.dataset.layout = layout; return; }
          tries += 1;
          if (compound && layout === "as designed") { s = stack(s); layout = "stacked"; }
          else {
            s = narrow(s, excess(el) + 4, Math.max(20, Math.floor(el.clientWidth / 8.5)));  // ~8 px a character
            layout = compound ? "stacked, narrowed" : "narrowed";
          }
          return draw(s).then(next);
        }
        return draw(s).then(next).catch(function (err) {
          el.textContent = "[chart failed: " + err + "]"; console.error(err);
        });
      }
      busy = fit();
      var timer = null;
      window.addEventListener("resize", function () {
        clearTimeout(timer);
        timer = setTimeout(function () {
          if (el.clientWidth !== width) busy = busy.then(fit);
        }, 250);
      });
    };
  })();
""" % {"narrowest": NARROWEST_VIEW, "slack": WIDEN_SLACK}
