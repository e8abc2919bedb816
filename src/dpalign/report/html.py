"""Render a :class:`Page` as one self-contained HTML file: inline CSS, figures embedded as
base64 PNGs, a few lines of inline JavaScript that sort a table on a header click, nothing
fetched from the network (jinja2 with autoescaping)."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass, field

import jinja2

from dpalign.report.plot import FigureOut
from dpalign.report.tables import Table
from dpalign.report.verdict import Verdict

__all__ = ["Block", "Page", "render_page"]


@dataclass(frozen=True)
class Block:
    """A reproducibility block: ``text`` shown verbatim (a command, a YAML config) or
    ``pairs`` shown as a name/value list."""

    title: str
    text: str | None = None
    pairs: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Page:
    """Everything a report page shows, in order."""

    title: str
    subtitle: str
    verdicts: Sequence[Verdict]
    rules: Sequence[str]
    figures: Sequence[FigureOut]
    tables: Sequence[Table]
    reproducibility: Sequence[Block]
    figure_dir: str = "figures"
    notes: Sequence[str] = field(default_factory=tuple)
    glance: Table | None = None
    answer: Sequence[str] = field(default_factory=tuple)
    """The opening answer (a few sentences), shown first."""
    recommendation: Table | None = None
    """The recommendation table, shown right after the answer."""
    fold_verdicts: bool = False
    """Fold the per-metric verdict sentences into a ``<details>`` block."""


_TEMPLATE = """{% macro sortable(table) -%}
<h3 id="table-{{ table.id }}">{{ table.title }}</h3>
<p>{{ table.caption }}</p>
<div class="scroll"><table class="sortable" id="{{ table.id }}">
<thead><tr>{% for h in table.headers %}<th>{{ h }}</th>{% endfor %}</tr></thead>
<tbody>{% for row in table.rows %}
<tr>{% for c in row %}<td data-sort="{{ c.sort }}">{{ c.text }}</td>{% endfor %}</tr>
{% endfor %}</tbody>
</table></div>
{% endmacro %}<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ page.title }}</title>
<style>
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto;
       max-width: 1280px; padding: 1rem 2rem 4rem; color: #1b1f24; }
h1 { margin-bottom: 0; } .sub { color: #555; margin-top: .2rem; }
nav a { margin-right: 1rem; } h2 { border-bottom: 2px solid #ddd; padding-top: 1rem; }
#verdict ul { padding-left: 1.2rem; } #verdict li { margin: .25rem 0; }
.rules { background: #f6f8fa; padding: .5rem 1rem; border-radius: 6px; }
figure { margin: 1.5rem 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #444; font-size: 14px; }
.scroll { overflow-x: auto; max-height: 38rem; overflow-y: auto; }
table { border-collapse: collapse; font-size: 13px; margin: .5rem 0 1.5rem; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; white-space: nowrap; }
th { background: #f0f3f6; position: sticky; top: 0; cursor: pointer; }
th[aria-sort="ascending"]::after { content: " ▲"; }
th[aria-sort="descending"]::after { content: " ▼"; }
td:first-child, th:first-child { text-align: left; }
tr:nth-child(even) td { background: #fafbfc; }
table.glance td { text-align: center; } table.glance th { cursor: default; }
table.glance td:first-child { text-align: left; }
td.rises, td.falls, td.non_monotone { font-weight: 600; }
p.answer { font-size: 16px; background: #eef6ee; padding: .6rem 1rem; border-radius: 6px; }
details { margin: 1rem 0; } summary { cursor: pointer; font-weight: 600; }
pre { background: #f6f8fa; padding: .75rem; overflow-x: auto; font-size: 13px; }
dl { display: grid; grid-template-columns: max-content auto; gap: .1rem 1rem; }
dt { font-weight: 600; } dd { margin: 0; font-family: ui-monospace, monospace; }
</style>
</head>
<body>
<header>
<h1>{{ page.title }}</h1>
<p class="sub">{{ page.subtitle }}</p>
<nav><a href="#verdict">Verdict</a><a href="#figures">Figures</a><a href="#tables">Tables</a>
<a href="#reproducibility">Reproducibility</a></nav>
</header>

<section id="verdict">
<h2>The answer</h2>
{% if page.answer %}
<p class="answer" id="answer">{{ page.answer | join(" ") }}</p>
{% endif %}
{% if page.recommendation %}
{{ sortable(page.recommendation) }}{% endif %}
{% for note in page.notes %}<p>{{ note }}</p>{% endfor %}
{% if page.glance %}
<h3>{{ page.glance.title }}</h3>
<p>{{ page.glance.caption }}</p>
<table class="glance">
<thead><tr>{% for h in page.glance.headers %}<th>{{ h }}</th>{% endfor %}</tr></thead>
<tbody>{% for row in page.glance.rows %}
<tr>{% for c in row %}<td class="{{ c.sort }}">{{ c.text }}</td>{% endfor %}</tr>
{% endfor %}</tbody>
</table>
{% endif %}
{% if page.fold_verdicts %}<details id="per-metric">
<summary>Per-metric sentences: every trend and breakpoint, with its numbers</summary>{% endif %}
{% for verdict in page.verdicts %}
<h3>{{ verdict.question }}</h3>
<ul>{% for sentence in verdict.sentences %}<li>{{ sentence }}</li>{% endfor %}</ul>
{% endfor %}
{% if page.fold_verdicts %}</details>{% endif %}
<div class="rules"><strong>How these sentences are decided</strong>
<ul>{% for rule in page.rules %}<li>{{ rule }}</li>{% endfor %}</ul></div>
</section>

<section id="figures">
<h2>Figures</h2>
{% for fig in figures %}
<figure id="figure-{{ fig.name }}">
<h3>{{ fig.title }}</h3>
<img alt="{{ fig.title }}" src="data:image/png;base64,{{ fig.b64 }}">
<figcaption>{{ fig.caption }} (<a href="{{ page.figure_dir }}/{{ fig.name }}.png">{{
 fig.name }}.png</a>)</figcaption>
</figure>
{% else %}<p>No figures: nothing was logged to plot.</p>{% endfor %}
</section>

<section id="tables">
<h2>Tables</h2>
{% for table in page.tables %}
{{ sortable(table) }}{% endfor %}
</section>

<section id="reproducibility">
<h2>Reproducibility</h2>
{% for block in page.reproducibility %}
<h3>{{ block.title }}</h3>
{% if block.text is not none %}<pre>{{ block.text }}</pre>{% endif %}
{% if block.pairs %}<dl>{% for name, value in block.pairs %}<dt>{{ name }}</dt>
<dd>{{ value }}</dd>{% endfor %}</dl>{% endif %}
{% endfor %}
</section>

<script>
(function () {
  "use strict";
  function key(row, index) {
    var v = row.cells[index].getAttribute("data-sort") || "";
    if (v === "") { return null; }
    var n = Number(v);
    return isNaN(n) ? v.toLowerCase() : n;
  }
  function compare(x, y) {
    if (x === null || y === null) { return (x === null) - (y === null); }
    if (typeof x !== typeof y) { return typeof x === "number" ? -1 : 1; }
    return x < y ? -1 : (x > y ? 1 : 0);
  }
  document.querySelectorAll("table.sortable th").forEach(function (th) {
    th.addEventListener("click", function () {
      var table = th.closest("table");
      var body = table.tBodies[0];
      var index = Array.prototype.indexOf.call(th.parentNode.children, th);
      var sign = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
      table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", sign > 0 ? "ascending" : "descending");
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = key(a, index), y = key(b, index);
        return (x === null || y === null) ? compare(x, y) : sign * compare(x, y);
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
}());
</script>
</body>
</html>
"""

_ENV = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined,
                          trim_blocks=True, lstrip_blocks=True)


@dataclass(frozen=True)
class _EmbeddedFigure:
    name: str
    title: str
    caption: str
    b64: str


def render_page(page: Page) -> str:
    """The page as one HTML document."""
    figures = [_EmbeddedFigure(f.name, f.title, f.caption,
                               base64.b64encode(f.png).decode("ascii")) for f in page.figures]
    return _ENV.from_string(_TEMPLATE).render(page=page, figures=figures)
