"""A small document model rendered twice: to Markdown (``report.md``) and to one self-contained HTML page.

Blocks are plain tuples so the report builds its content once:

* ``Heading(level, text, anchor)``, ``Para(text)``, ``Bullets(items)``,
* ``Table(headers, rows, numeric)`` (``numeric`` = column indexes right-aligned in HTML),
* ``Chart(spec)``: an interactive SVG chart in HTML (see :mod:`fteval.analysis.assets` for
  the spec format); in Markdown a one-line pointer to the HTML chart.

Inline markup in text: ``**bold**``, ```code``` and ``[text](path)`` links, nothing else; everything is HTML-escaped.
"""

from __future__ import annotations

import html
import json
import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, Union

from fteval.analysis.assets import CSS, JS

__all__ = ["Heading", "Para", "Bullets", "Table", "Chart", "Block", "format_number", "to_markdown", "to_html"]


def format_number(value: Any, digits: int = 4) -> str:
    """A number as the report and the comparison print it.

    'n/a' for None, NaN and inf; integers of 1000 or more with thousands separators (1,234,567);
    everything else to ``digits`` significant digits.
    """
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, numbers.Integral) and abs(value) >= 1000:
        return f"{int(value):,}"
    return f"{value:.{digits}g}"


@dataclass
class Heading:
    level: int
    text: str
    anchor: str = ""


@dataclass
class Para:
    text: str
    note: bool = False  # smaller, muted in HTML


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    numeric: tuple[int, ...] = ()


@dataclass
class Chart:
    spec: dict[str, Any]  # id, kind (line | scatter | bars), title, xlabel, ylabel, series | categories, hint


Block = Union[Heading, Para, Bullets, Table, Chart]

_BOLD = re.compile(r"\*\*(.+?)\*\*")
_CODE = re.compile(r"`([^`]+)`")
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")  # [text](relative/path): links to the exported files


def _inline(text: str) -> str:
    out = html.escape(str(text))
    out = _LINK.sub(r'<a href="\2">\1</a>', out)
    out = _CODE.sub(r"<code>\1</code>", out)
    return _BOLD.sub(r"<strong>\1</strong>", out)


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(title: str, blocks: list[Block]) -> str:
    """The Markdown text of the document (GitHub tables)."""
    lines = [f"# {title}", ""]
    for b in blocks:
        if isinstance(b, Heading):
            lines += ["#" * (b.level) + " " + b.text, ""]
        elif isinstance(b, Para):
            lines += [("_" + b.text + "_") if b.note else b.text, ""]
        elif isinstance(b, Bullets):
            lines += [f"- {item}" for item in b.items] + [""]
        elif isinstance(b, Table):
            lines.append("| " + " | ".join(_md_cell(h) for h in b.headers) + " |")
            lines.append("|" + "|".join("---:" if i in b.numeric else "---" for i in range(len(b.headers))) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            lines.append("")
        elif isinstance(b, Chart):
            lines += [f"_Chart: {b.spec['title']} (interactive in report.html)._", ""]
    return "\n".join(lines)


def _clean(value: Any) -> Any:
    """JSON-safe chart data: NaN/inf -> null (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def to_html(title: str, blocks: list[Block], subtitle: str = "") -> str:
    """One self-contained HTML page: inline CSS, inline chart data (JSON) and inline JS; no external request."""
    body: list[str] = []
    nav: list[str] = []
    charts: list[dict[str, Any]] = []
    for b in blocks:
        if isinstance(b, Heading):
            anchor = b.anchor or re.sub(r"[^a-z0-9]+", "-", b.text.lower()).strip("-")
            if b.level == 2:
                nav.append(f'<a href="#{anchor}">{html.escape(b.text)}</a>')
            body.append(f'<h{b.level} id="{anchor}">{_inline(b.text)}</h{b.level}>')
        elif isinstance(b, Para):
            body.append(f'<p class="note">{_inline(b.text)}</p>' if b.note else f"<p>{_inline(b.text)}</p>")
        elif isinstance(b, Bullets):
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{_inline(h)}</th>" for h in b.headers)
            rows = "".join(
                "<tr>" + "".join(f'<td{" class=num" if i in b.numeric else ""}>{_inline(c)}</td>' for i, c in enumerate(row))
                + "</tr>" for row in b.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif isinstance(b, Chart):
            spec = _clean(b.spec)
            charts.append(spec)
            hint = spec.get("hint") or ("hover for values" if spec["kind"] == "bars" else
                                        "hover for values; drag a box to zoom, wheel zooms the x axis, double-click resets")
            css = "chart small" if spec.get("small") else "chart"
            body.append(f'<div class="{css}" id="{html.escape(spec["id"])}" data-kind="{spec["kind"]}">'
                        f'<h4>{_inline(spec["title"])}</h4><div class="hint">{_inline(hint)}</div></div>')
    # "<" as \u003c: no "</script>" or "<!--" can end or confuse the data block, whatever the labels say
    data = json.dumps(charts, allow_nan=False, separators=(",", ":")).replace("<", "\\u003c")
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{CSS}</style>",
        "</head>",
        "<body>",
        "<nav>" + "".join(nav) + "</nav>",
        "<main>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="muted">{_inline(subtitle)}</p>' if subtitle else "",
        "<noscript><p><strong>JavaScript is off: the charts are not drawn; every number is in the tables.</strong></p></noscript>",
        *body,
        "</main>",
        f'<script type="application/json" id="fteval-charts">{data}</script>',
        f"<script>{JS}</script>",
        "</body>",
        "</html>",
        "",
    ])
