"""The study report: one self-contained HTML page (``report.html``) that answers the question
first (sentences generated from the numbers, :mod:`.verdict`), then shows figures
(:mod:`.study_figures`, :mod:`.run_figures`, also written as PNGs under ``figures/``), tables
and what is needed to reproduce the study. Works on a study directory and on a single run directory.

    >>> from dpalign.report import build_report
    >>> build_report("runs/my-study")          # doctest: +SKIP
    PosixPath('runs/my-study/report.html')
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dpalign.io import atomic_write_bytes, atomic_write_text
from dpalign.report.html import render_page
from dpalign.report.load import ReportInputError, load_input
from dpalign.report.pages import build_page

__all__ = ["ReportInputError", "WrittenReport", "build_report", "write_report"]


@dataclass(frozen=True)
class WrittenReport:
    """What :func:`write_report` wrote: the page, its PNG figures, and the verdict
    sentences (in page order)."""

    html: Path
    figures: tuple[Path, ...]
    sentences: tuple[str, ...]


def write_report(path: str | Path, *, out: str | Path | None = None) -> WrittenReport:
    """Build the report of the study or run directory ``path``.

    Writes ``out`` (default ``path/report.html``) and one PNG per figure into
    ``figures/`` beside it, each atomically. Raises :class:`ReportInputError` (naming the
    path) when ``path`` is neither a study nor a run directory.
    """
    page = build_page(load_input(path))
    html = Path(out) if out is not None else Path(path) / "report.html"
    figure_dir = html.parent / page.figure_dir
    figures = tuple(atomic_write_bytes(figure_dir / f"{fig.name}.png", fig.png)
                    for fig in page.figures)
    atomic_write_text(html, render_page(page))
    sentences = tuple(s for verdict in page.verdicts for s in verdict.sentences)
    return WrittenReport(html, figures, sentences)


def build_report(path: str | Path, *, out: str | Path | None = None) -> Path:
    """:func:`write_report` returning just the HTML file's path."""
    return write_report(path, out=out).html
