"""The report in a real browser: headless Chromium renders it offline with no console
errors, and the inline script sorts a table numerically on a header click.

Needs Chromium (Debian: ``apt-get install chromium``); skipped when none is on PATH.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from report_fixtures import Recipe, write_study

from dpalign.report import build_report

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CONSOLE = re.compile(r":CONSOLE[(:]\d+")  # "[...:INFO:CONSOLE:12] "message", source: ..."


def _browser() -> str:
    found = next((path for path in map(shutil.which, BROWSERS) if path), None)
    if found is None:
        pytest.skip("no headless browser on PATH (tried " + ", ".join(BROWSERS) + "); "
                    "install one with `apt-get install chromium` (Debian/Ubuntu)")
    return found


def _run(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Open ``page`` headless with console messages logged to stderr."""
    command = [_browser(), "--headless", "--no-sandbox", "--disable-gpu",
               "--hide-scrollbars", "--no-first-run", f"--user-data-dir={profile}",
               "--virtual-time-budget=3000", "--enable-logging=stderr", "--v=0",
               *args, page.as_uri()]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=120,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{command[0]} did not finish within 120 s: {exc}")


def _console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if CONSOLE.search(line)]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("browser") / "study"
    return build_report(write_study(root, Recipe(ks=(4, 16), seeds=(0, 1),
                                                 epsilons=(float("inf"), 8.0, 1.0),
                                                 diverge_below=2.0, noisy=True)))


def test_console_errors_are_detected(tmp_path: Path) -> None:
    """The check below is not vacuous: a page that logs an error is caught."""
    page = tmp_path / "bad.html"
    page.write_text('<!doctype html><p>x</p><script>console.error("boom");</script>')
    lines = _console_lines(_run(page, tmp_path / "profile", "--dump-dom").stderr)
    assert any("boom" in line for line in lines)


def test_report_renders_offline_without_console_errors(report: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    result = _run(report, tmp_path / "profile", f"--screenshot={shot}",
                  "--window-size=1280,2400")
    assert _console_lines(result.stderr) == []
    assert shot.exists() and shot.stat().st_size > 50_000, result.stderr[-2000:]


def test_clicking_a_header_sorts_numerically(report: Path, tmp_path: Path) -> None:
    page = tmp_path / "clicked.html"
    click = ("<script>Array.from(document.querySelectorAll('#runs th'))"
             ".find(function (th) { return th.textContent === 'K'; }).click();</script>")
    page.write_text(report.read_text().replace("</body>", click + "</body>"))
    result = _run(page, tmp_path / "profile", "--dump-dom")
    assert _console_lines(result.stderr) == []
    runs = result.stdout.split('id="runs"')[1].split("</table>")[0]
    rows = re.findall(r"<tr>(.*?)</tr>", runs, flags=re.S)[1:]  # skip the header row
    ks = [int(re.findall(r'data-sort="([^"]*)"', row)[4]) for row in rows]
    assert ks == sorted(ks) and ks[0] == 4 and ks[-1] == 16  # numeric: "16" < "4" as text
    assert 'aria-sort="ascending"' in runs
