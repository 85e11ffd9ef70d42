"""Inline CSS and JavaScript of the self-contained ``report.html`` (no CDN, no external library).

Hand-written because the page must open offline from one file and the project depends on no
plotting library for the browser. The script draws SVG charts from the JSON in
``<script type="application/json" id="fteval-charts">``:

Common keys: ``id``, ``kind``, ``title``, ``xlabel``, ``ylabel``, ``width``/``height`` (SVG units,
default 860 x 360), ``small`` (three to a row), ``integerX`` (integer x ticks).

* ``line``: series of ``{x, y}`` points (optional ``dash``, ``markers``, horizontal ``hlines``;
  points with ``lo``/``hi`` get error bars, or a shaded band when the series sets ``band``);
  drag a rectangle to zoom, mouse wheel zooms the x axis, double-click or "reset" restores;
* ``bars``: categories with a value and an optional ``[low, high]`` interval (error bar);
* ``scatter``: labelled points with optional intervals and a ``frontier`` polyline; zoom as ``line``.

Hovering shows the values of the nearest point or bar. When every chart is drawn the script
sets ``data-charts-rendered`` (count) and ``data-chart-errors`` (count) on ``<html>`` and
appends " [N charts]" to ``document.title``; errors are also written with ``console.error``.
"""

CSS = """
:root { --fg:#1d2430; --muted:#5b6575; --line:#d9dee7; --bg:#ffffff; --accent:#2b6cb0; }
* { box-sizing: border-box; }
body { font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: var(--bg); margin: 0; }
main { max-width: 1180px; margin: 0 auto; padding: 16px 28px 48px; }
h1 { font-size: 26px; margin: 12px 0 4px; } h2 { font-size: 20px; margin: 28px 0 8px;
     border-bottom: 1px solid var(--line); padding-bottom: 4px; } h3 { font-size: 16px; margin: 18px 0 6px; }
nav { position: sticky; top: 0; background: #f6f8fb; border-bottom: 1px solid var(--line); padding: 6px 28px;
      font-size: 13px; z-index: 5; } nav a { margin-right: 14px; color: var(--accent); text-decoration: none; }
table { border-collapse: collapse; margin: 8px 0 14px; font-size: 13px; display: block; overflow-x: auto; }
th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f2f4f8; } tr:nth-child(even) td { background: #fafbfc; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
code { background: #f2f4f8; padding: 0 3px; border-radius: 3px; }
.muted { color: var(--muted); } .note { color: var(--muted); font-size: 13px; }
.chart { border: 1px solid var(--line); border-radius: 6px; margin: 10px 0 18px; padding: 6px 8px; position: relative; }
.chart.small { display: inline-block; width: calc(33% - 12px); margin-right: 8px; vertical-align: top; }
.chart h4 { margin: 2px 0 2px; font-size: 14px; } .chart .hint { font-size: 12px; color: var(--muted); }
.chart svg { width: 100%; height: auto; display: block; user-select: none; }
.chart button { font-size: 12px; margin-left: 8px; }
.tip { position: absolute; pointer-events: none; background: rgba(20,24,32,.92); color: #fff; font-size: 12px;
       padding: 4px 7px; border-radius: 4px; white-space: pre; display: none; z-index: 3; }
.badge { display: inline-block; padding: 0 6px; border-radius: 9px; font-size: 12px; background: #e8eef8; }
.good { color: #1f7a3a; } .bad { color: #a32020; }
"""

JS = r"""
(function () {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";
  var COLORS = ["#2b6cb0", "#dd6b20", "#2f855a", "#b83280", "#6b46c1", "#c53030", "#319795", "#975a16"];
  var M = {l: 64, r: 16, t: 12, b: 46};
  // every chart has its own size (spec.width x spec.height in SVG units, default 860 x 360)
  function dims(spec) { return {W: spec.width || 860, H: spec.height || 360}; }
  var errors = 0;
  function fail(msg) { errors += 1; console.error("fteval chart: " + msg); }
  window.addEventListener("error", function (e) { fail(e.message || String(e)); });

  function el(name, attrs, parent) {
    var node = document.createElementNS(NS, name);
    for (var k in attrs) { if (attrs[k] !== undefined && attrs[k] !== null) node.setAttribute(k, attrs[k]); }
    if (parent) parent.appendChild(node);
    return node;
  }
  function fmt(v) {
    if (v === null || v === undefined || !isFinite(v)) return "n/a";
    var a = Math.abs(v);
    if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(3);
    return String(Math.round(v * 10000) / 10000);
  }
  function ticks(lo, hi, n, integer) {
    if (!(hi > lo)) { hi = lo + 1; }
    var step = Math.pow(10, Math.floor(Math.log10((hi - lo) / n)));
    var err = (hi - lo) / n / step;
    if (err >= 7.5) step *= 10; else if (err >= 3.5) step *= 5; else if (err >= 1.5) step *= 2;
    var out = [], v = Math.ceil(lo / step) * step;
    for (; v <= hi + step * 1e-9; v += step) out.push(Math.round(v / step) * step);
    return integer ? out.filter(function (t) { return Math.abs(t - Math.round(t)) < 1e-9; }) : out;
  }
  function extent(values, pad) {
    var f = values.filter(function (v) { return v !== null && isFinite(v); });
    if (!f.length) return [0, 1];
    var lo = Math.min.apply(null, f), hi = Math.max.apply(null, f);
    if (lo === hi) { lo -= Math.abs(lo) * 0.1 || 1; hi += Math.abs(hi) * 0.1 || 1; }
    var p = (hi - lo) * (pad || 0.05);
    return [lo - p, hi + p];
  }
  function tipAt(box, tip, evt, text) {
    var r = box.getBoundingClientRect();
    tip.textContent = text; tip.style.display = "block";
    var x = evt.clientX - r.left + 14, y = evt.clientY - r.top + 10;
    if (x + tip.offsetWidth > r.width) x = x - tip.offsetWidth - 28;
    tip.style.left = x + "px"; tip.style.top = y + "px";
  }

  function frame(spec, box) {
    var d = dims(spec);
    var svg = el("svg", {viewBox: "0 0 " + d.W + " " + d.H, role: "img", "aria-label": spec.title});
    box.appendChild(svg);
    var tip = document.createElement("div"); tip.className = "tip"; box.appendChild(tip);
    return {svg: svg, tip: tip};
  }
  function axes(g, sx, sy, xdom, ydom, spec, categorical) {
    var W = dims(spec).W, H = dims(spec).H;
    var gx = el("g", {"class": "axes"}, g);
    el("line", {x1: M.l, y1: H - M.b, x2: W - M.r, y2: H - M.b, stroke: "#888"}, gx);
    el("line", {x1: M.l, y1: M.t, x2: M.l, y2: H - M.b, stroke: "#888"}, gx);
    ticks(ydom[0], ydom[1], 6).forEach(function (t) {
      el("line", {x1: M.l, y1: sy(t), x2: W - M.r, y2: sy(t), stroke: "#eef0f4"}, gx);
      el("text", {x: M.l - 6, y: sy(t) + 4, "text-anchor": "end", "font-size": 11, fill: "#555"}, gx).textContent = fmt(t);
    });
    if (!categorical) {
      ticks(xdom[0], xdom[1], 8, spec.integerX).forEach(function (t) {
        el("line", {x1: sx(t), y1: H - M.b, x2: sx(t), y2: H - M.b + 4, stroke: "#888"}, gx);
        el("text", {x: sx(t), y: H - M.b + 16, "text-anchor": "middle", "font-size": 11, fill: "#555"}, gx).textContent = fmt(t);
      });
    }
    el("text", {x: (M.l + W - M.r) / 2, y: H - 8, "text-anchor": "middle", "font-size": 12, fill: "#333"}, gx).textContent = spec.xlabel || "";
    var yl = el("text", {x: 14, y: (M.t + H - M.b) / 2, "text-anchor": "middle", "font-size": 12, fill: "#333",
                         transform: "rotate(-90 14 " + (M.t + H - M.b) / 2 + ")"}, gx);
    yl.textContent = spec.ylabel || "";
  }
  function legend(box, series) {
    var div = document.createElement("div"); div.className = "hint";
    series.forEach(function (ser, i) {
      var s = document.createElement("span"), b = document.createElement("b");
      b.style.color = ser.color || COLORS[i % COLORS.length]; b.textContent = "\u25A0 ";
      s.appendChild(b);
      s.appendChild(document.createTextNode(ser.name + "   "));
      div.appendChild(s);
    });
    box.appendChild(div);
  }

  // line and scatter: zoomable x/y domains, redrawn from scratch on each zoom
  function xyChart(spec, box) {
    var f = frame(spec, box), svg = f.svg, tip = f.tip, W = dims(spec).W, H = dims(spec).H;
    var pts = [];
    (spec.series || []).forEach(function (s) { s.points.forEach(function (p) { pts.push(p); }); });
    var xs = pts.map(function (p) { return p.x; });
    var ys = [];
    pts.forEach(function (p) { ys.push(p.y); if (p.lo !== undefined) { ys.push(p.lo); ys.push(p.hi); } });
    (spec.hlines || []).forEach(function (h) { ys.push(h.y); });
    var full = {x: extent(xs, 0.03), y: extent(ys, 0.08)};
    var dom = {x: full.x.slice(), y: full.y.slice()};
    var g = el("g", {}, svg);
    function sx(v) { return M.l + (v - dom.x[0]) / (dom.x[1] - dom.x[0]) * (W - M.l - M.r); }
    function sy(v) { return H - M.b - (v - dom.y[0]) / (dom.y[1] - dom.y[0]) * (H - M.t - M.b); }
    function ix(px) { return dom.x[0] + (px - M.l) / (W - M.l - M.r) * (dom.x[1] - dom.x[0]); }
    function iy(py) { return dom.y[0] + (H - M.b - py) / (H - M.t - M.b) * (dom.y[1] - dom.y[0]); }
    var screen = [];
    function draw() {
      while (g.firstChild) g.removeChild(g.firstChild);
      axes(g, sx, sy, dom.x, dom.y, spec, false);
      el("clipPath", {id: spec.id + "-clip"}, g).appendChild(el("rect", {x: M.l, y: M.t, width: W - M.l - M.r, height: H - M.t - M.b}));
      var plot = el("g", {"clip-path": "url(#" + spec.id + "-clip)"}, g);
      (spec.hlines || []).forEach(function (h) {
        el("line", {x1: M.l, x2: W - M.r, y1: sy(h.y), y2: sy(h.y), stroke: "#888", "stroke-dasharray": "3 3"}, plot);
        el("text", {x: W - M.r - 4, y: sy(h.y) - 4, "text-anchor": "end", "font-size": 11, fill: "#666"}, plot).textContent = h.label || "";
      });
      screen = [];
      (spec.series || []).forEach(function (s, i) {
        var c = s.color || COLORS[i % COLORS.length];
        if (spec.kind === "line" && s.band) {  // the [lo, hi] interval as a shaded area instead of error bars
          var bp = s.points.filter(function (p) { return p.lo !== undefined && p.lo !== null; });
          if (bp.length > 1) {
            var up = bp.map(function (p, j) { return (j ? "L" : "M") + sx(p.x).toFixed(1) + "," + sy(p.hi).toFixed(1); });
            var down = bp.slice().reverse().map(function (p) { return "L" + sx(p.x).toFixed(1) + "," + sy(p.lo).toFixed(1); });
            el("path", {d: up.join("") + down.join("") + "Z", fill: c, opacity: 0.15, stroke: "none"}, plot);
          }
        }
        if (spec.kind === "line" && s.points.length > 1) {
          var d = s.points.map(function (p, j) { return (j ? "L" : "M") + sx(p.x).toFixed(1) + "," + sy(p.y).toFixed(1); }).join("");
          el("path", {d: d, fill: "none", stroke: c, "stroke-width": s.width || 2, "stroke-dasharray": s.dash ? "6 4" : null,
                      opacity: s.opacity || 1}, plot);
        }
        s.points.forEach(function (p) {
          if (p.lo !== undefined && p.lo !== null && !(s.band && s.points.length > 1)) {
            el("line", {x1: sx(p.x), x2: sx(p.x), y1: sy(p.lo), y2: sy(p.hi), stroke: c, "stroke-width": 1.5}, plot);
          }
          if (spec.kind === "scatter" || s.markers) {
            el("circle", {cx: sx(p.x), cy: sy(p.y), r: spec.kind === "scatter" ? 6 : 3.5, fill: c,
                          stroke: p.highlight ? "#000" : "#fff", "stroke-width": p.highlight ? 2 : 1}, plot);
          }
          if (spec.kind === "scatter" && p.label) {
            el("text", {x: sx(p.x) + 9, y: sy(p.y) - 7, "font-size": 12, fill: "#222"}, plot).textContent = p.label;
          }
          screen.push({x: sx(p.x), y: sy(p.y), p: p, s: s});
        });
      });
      if (spec.frontier && spec.frontier.length > 1) {
        var fd = spec.frontier.map(function (p, j) { return (j ? "L" : "M") + sx(p.x).toFixed(1) + "," + sy(p.y).toFixed(1); }).join("");
        el("path", {d: fd, fill: "none", stroke: "#2f855a", "stroke-width": 1.5, "stroke-dasharray": "5 3"}, plot);
      }
    }
    draw();
    var cursor = el("line", {stroke: "#999", "stroke-width": 1, visibility: "hidden"}, svg);
    var sel = el("rect", {fill: "rgba(43,108,176,.15)", stroke: "#2b6cb0", visibility: "hidden"}, svg);
    function local(evt) {
      var r = svg.getBoundingClientRect();
      return {x: (evt.clientX - r.left) * W / r.width, y: (evt.clientY - r.top) * H / r.height};
    }
    var drag = null;
    svg.addEventListener("mousedown", function (evt) { drag = local(evt); evt.preventDefault(); });
    svg.addEventListener("mousemove", function (evt) {
      var q = local(evt);
      if (drag) {
        sel.setAttribute("x", Math.min(drag.x, q.x)); sel.setAttribute("y", Math.min(drag.y, q.y));
        sel.setAttribute("width", Math.abs(q.x - drag.x)); sel.setAttribute("height", Math.abs(q.y - drag.y));
        sel.setAttribute("visibility", "visible");
        return;
      }
      // line: the step nearest in x (then in y) anywhere over the plot; scatter: the nearest point within 80 units
      var best = null, bd = Infinity, inside = q.x >= M.l && q.x <= W - M.r && q.y >= M.t && q.y <= H - M.b;
      screen.forEach(function (s) {
        var d = spec.kind === "line" ? Math.abs(s.x - q.x) * 1000 + Math.abs(s.y - q.y) : Math.hypot(s.x - q.x, s.y - q.y);
        if (s.x >= M.l && s.x <= W - M.r && d < bd) { bd = d; best = s; }
      });
      if (!best || !inside || (spec.kind !== "line" && bd > 80)) {
        tip.style.display = "none"; cursor.setAttribute("visibility", "hidden"); return;
      }
      if (spec.kind === "line") {
        var lines = [(spec.xlabel || "x") + " " + fmt(best.p.x)];
        (spec.series || []).forEach(function (s) {
          s.points.forEach(function (p) { if (p.x === best.p.x) lines.push(s.name + ": " + fmt(p.y)); });
        });
        cursor.setAttribute("x1", best.x); cursor.setAttribute("x2", best.x);
        cursor.setAttribute("y1", M.t); cursor.setAttribute("y2", H - M.b); cursor.setAttribute("visibility", "visible");
        tipAt(box, tip, evt, lines.join("\n"));
      } else {
        var t = (best.p.label || best.s.name) + "\n" + (spec.xlabel || "x") + ": " + fmt(best.p.x) + "\n" +
                (spec.ylabel || "y") + ": " + fmt(best.p.y);
        if (best.p.lo !== undefined && best.p.lo !== null) t += " [" + fmt(best.p.lo) + ", " + fmt(best.p.hi) + "]";
        if (best.p.note) t += "\n" + best.p.note;
        tipAt(box, tip, evt, t);
      }
    });
    function zoomTo(x0, x1, y0, y1) { dom.x = [x0, x1]; if (y0 !== undefined) dom.y = [y0, y1]; draw(); }
    window.addEventListener("mouseup", function (evt) {
      if (!drag) return;
      var q = local(evt), a = drag; drag = null; sel.setAttribute("visibility", "hidden");
      if (Math.abs(q.x - a.x) < 6) return;
      var ya = iy(Math.max(a.y, q.y)), yb = iy(Math.min(a.y, q.y));
      if (Math.abs(q.y - a.y) < 6) { ya = dom.y[0]; yb = dom.y[1]; }
      zoomTo(ix(Math.min(a.x, q.x)), ix(Math.max(a.x, q.x)), ya, yb);
    });
    svg.addEventListener("mouseleave", function () { tip.style.display = "none"; cursor.setAttribute("visibility", "hidden"); });
    svg.addEventListener("wheel", function (evt) {
      evt.preventDefault();
      var c = ix(local(evt).x), k = evt.deltaY < 0 ? 0.8 : 1.25;
      zoomTo(c - (c - dom.x[0]) * k, c + (dom.x[1] - c) * k);
    }, {passive: false});
    function reset() { dom = {x: full.x.slice(), y: full.y.slice()}; draw(); }
    svg.addEventListener("dblclick", reset);
    var btn = document.createElement("button"); btn.textContent = "reset zoom"; btn.addEventListener("click", reset);
    box.querySelector("h4").appendChild(btn);
    legend(box, spec.series || []);
    box.chartApi = {zoomTo: zoomTo, reset: reset, domain: function () { return dom; }};
  }

  function barChart(spec, box) {
    var f = frame(spec, box), svg = f.svg, tip = f.tip, W = dims(spec).W, H = dims(spec).H;
    var cats = spec.categories || [];
    var vals = [0];
    cats.forEach(function (c) { vals.push(c.value); if (c.lo !== undefined && c.lo !== null) { vals.push(c.lo); vals.push(c.hi); } });
    var ydom = extent(vals, 0.08);
    if (ydom[0] > 0) ydom[0] = 0;
    function sy(v) { return H - M.b - (v - ydom[0]) / (ydom[1] - ydom[0]) * (H - M.t - M.b); }
    var band = (W - M.l - M.r) / Math.max(cats.length, 1);
    axes(svg, null, sy, null, ydom, spec, true);
    el("line", {x1: M.l, x2: W - M.r, y1: sy(0), y2: sy(0), stroke: "#666"}, svg);
    cats.forEach(function (c, i) {
      var x = M.l + band * i + band * 0.2, w = band * 0.6, col = c.color || COLORS[(c.group === undefined ? i : c.group) % COLORS.length];
      var v = (c.value === null || !isFinite(c.value)) ? 0 : c.value;
      var rect = el("rect", {x: x, y: Math.min(sy(v), sy(0)), width: w, height: Math.abs(sy(v) - sy(0)) || 1, fill: col, opacity: 0.85}, svg);
      if (c.lo !== undefined && c.lo !== null) {
        var cx = x + w / 2;
        el("line", {x1: cx, x2: cx, y1: sy(c.lo), y2: sy(c.hi), stroke: "#111", "stroke-width": 1.5}, svg);
        el("line", {x1: cx - 6, x2: cx + 6, y1: sy(c.lo), y2: sy(c.lo), stroke: "#111"}, svg);
        el("line", {x1: cx - 6, x2: cx + 6, y1: sy(c.hi), y2: sy(c.hi), stroke: "#111"}, svg);
      }
      el("text", {x: x + w / 2, y: H - M.b + 16, "text-anchor": "middle", "font-size": 11, fill: "#333"}, svg).textContent = c.name;
      var hasCi = c.lo !== undefined && c.lo !== null;  // keep the value label clear of the error bar
      el("text", {x: hasCi ? x + w * 0.75 : x + w / 2, y: Math.min(sy(v), sy(0)) - 4, "text-anchor": "middle", "font-size": 11,
                  fill: "#333"}, svg).textContent = fmt(c.value);
      rect.addEventListener("mousemove", function (evt) {
        var t = c.name + ": " + fmt(c.value) + (spec.unit ? " " + spec.unit : "");
        if (c.lo !== undefined && c.lo !== null) t += "\n95% CI [" + fmt(c.lo) + ", " + fmt(c.hi) + "]";
        if (c.note) t += "\n" + c.note;
        tipAt(box, tip, evt, t);
      });
      rect.addEventListener("mouseleave", function () { tip.style.display = "none"; });
    });
  }

  function render() {
    var node = document.getElementById("fteval-charts"), specs = [], drawn = 0;
    try { specs = JSON.parse(node.textContent); } catch (e) { fail("chart data: " + e.message); }
    specs.forEach(function (spec) {
      var box = document.getElementById(spec.id);
      if (!box) { fail("no element for chart " + spec.id); return; }
      try {
        if (spec.kind === "bars") barChart(spec, box); else xyChart(spec, box);
        box.setAttribute("data-rendered", "true");
        drawn += 1;
      } catch (e) { fail(spec.id + ": " + e.message); }
    });
    document.documentElement.setAttribute("data-charts-rendered", String(drawn));
    document.documentElement.setAttribute("data-chart-errors", String(errors));
    document.title = document.title + " [" + drawn + " charts]";
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", render); else render();
})();
"""
