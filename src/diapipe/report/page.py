"""The report page: sections of figures, tables and notes rendered to one static HTML
file with a small stylesheet beside it (no JavaScript, no external resources)."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

__all__ = ["STYLESHEET", "Figure", "Section", "Table", "render_page"]

STYLESHEET = """\
body { font-family: "DejaVu Sans", Helvetica, Arial, sans-serif; margin: 0; color: #1d1d1d;
       background: #fafafa; line-height: 1.45; }
header { background: #17324d; color: #fff; padding: 1.2em 2em; }
header h1 { margin: 0 0 0.2em 0; font-size: 1.7em; }
header p { margin: 0.15em 0; color: #d8e4ef; font-size: 0.92em; }
nav { background: #e8eef4; padding: 0.5em 2em; font-size: 0.92em; }
nav a { margin-right: 1.1em; color: #17324d; text-decoration: none; }
main { max-width: 1150px; margin: 0 auto; padding: 0.5em 2em 3em 2em; }
section { background: #fff; border: 1px solid #dde3ea; border-radius: 6px; padding: 0.6em 1.4em 1em 1.4em;
          margin: 1.4em 0; }
h2 { color: #17324d; border-bottom: 2px solid #e08214; padding-bottom: 0.2em; font-size: 1.3em; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #e2e2e2; }
figcaption { font-size: 0.9em; color: #444; margin-top: 0.3em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #d4d9df; padding: 0.25em 0.7em; }
th { background: #eef2f6; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.note { background: #fff6e0; border-left: 4px solid #e0a400; padding: 0.5em 0.9em; margin: 0.7em 0;
        font-size: 0.92em; }
.pass { color: #1b7837; font-weight: bold; }
.fail { color: #c51b7d; font-weight: bold; }
.tiles { display: flex; flex-wrap: wrap; gap: 0.8em; margin: 0.8em 0; }
.tile { background: #eef2f6; border-radius: 6px; padding: 0.5em 1em; min-width: 8.5em; }
.tile .value { font-size: 1.45em; font-weight: bold; color: #17324d; }
.tile .what { font-size: 0.82em; color: #444; }
footer { text-align: center; font-size: 0.8em; color: #777; padding: 1em; }
"""


@dataclass
class Figure:
    """A PNG of the report folder (``filename`` relative to it), its alt text and caption."""

    filename: str
    alt: str
    caption: str = ""
    width: int = 0
    height: int = 0


@dataclass
class Table:
    """A table: header cells and rows of cells (str or number; numbers right-aligned)."""

    header: list
    rows: list
    caption: str = ""


@dataclass
class Section:
    """One heading of the page; ``notes`` say what is missing (shown in a highlighted box)."""

    key: str
    title: str
    intro: str = ""
    figures: list = field(default_factory=list)
    tables: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    tiles: list = field(default_factory=list)  # (value, what)
    raw_html: str = ""


def _cell(value, tag="td") -> str:
    if isinstance(value, bool) or value is None:
        return f"<{tag}>{html.escape(str(value))}</{tag}>"
    if isinstance(value, (int, float)):
        text = f"{value:,}" if isinstance(value, int) else (f"{value:.4g}" if math.isfinite(value) else "–")
        return f'<{tag} class="num">{text}</{tag}>'
    return f"<{tag}>{value}</{tag}>"  # already HTML (callers escape text)


def _table(table: Table) -> str:
    out = ["<table>"]
    if table.caption:
        out.append(f"<caption>{html.escape(table.caption)}</caption>")
    out.append("<thead><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in table.header) + "</tr></thead>")
    out.append("<tbody>")
    for row in table.rows:
        out.append("<tr>" + "".join(_cell(v) for v in row) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _section(section: Section) -> str:
    out = [f'<section id="{html.escape(section.key)}">', f"<h2>{html.escape(section.title)}</h2>"]
    if section.intro:
        out.append(f"<p>{section.intro}</p>")
    for note in section.notes:
        out.append(f'<p class="note"><strong>Not shown:</strong> {html.escape(note)}</p>')
    if section.tiles:
        out.append('<div class="tiles">')
        for value, what in section.tiles:
            out.append(f'<div class="tile"><div class="value">{html.escape(str(value))}</div>'
                       f'<div class="what">{html.escape(what)}</div></div>')
        out.append("</div>")
    for fig in section.figures:
        size = f' width="{fig.width}" height="{fig.height}"' if fig.width and fig.height else ""
        out.append(f'<figure><img src="{html.escape(fig.filename)}" alt="{html.escape(fig.alt)}"{size}>')
        if fig.caption:
            out.append(f"<figcaption>{html.escape(fig.caption)}</figcaption>")
        out.append("</figure>")
    for table in section.tables:
        out.append(_table(table))
    if section.raw_html:
        out.append(section.raw_html)
    out.append("</section>")
    return "\n".join(out)


def render_page(outdir, sections: list[Section], *, title: str, subtitle_lines=()) -> Path:
    """Write ``index.html`` and ``style.css`` into ``outdir``; returns the index path."""
    outdir = Path(outdir)
    (outdir / "style.css").write_text(STYLESHEET)
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    nav = " ".join(f'<a href="#{html.escape(s.key)}">{html.escape(s.title)}</a>' for s in sections)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        '<link rel="stylesheet" href="style.css">',
        "</head>",
        "<body>",
        f"<header><h1>{html.escape(title)}</h1>",
        *[f"<p>{html.escape(line)}</p>" for line in subtitle_lines],
        f"<p>Generated {now} by diapipe report.</p></header>",
        f"<nav>{nav}</nav>",
        "<main>",
        *[_section(s) for s in sections],
        "</main>",
        "<footer>diapipe — static report; figures are PNG files in this folder.</footer>",
        "</body>",
        "</html>",
    ]
    index = outdir / "index.html"
    index.write_text("\n".join(parts) + "\n")
    return index
