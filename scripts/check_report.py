#!/usr/bin/env python3
"""Open a natgrad HTML report in headless Chromium; fail unless the rendered DOM holds its tables.

Usage: python scripts/check_report.py REPORT.html [--screenshot OUT.png] [--chromium PATH]

Exit 0 when Chromium renders the page and the DOM has every table (one row per model in each),
1 when a check fails, 2 on bad input.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

TABLES = ("table-models", "table-eval", "table-1", "table-5", "table-6", "table-7")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class Rows(HTMLParser):
    """Model rows (``<tr data-model>``) per table id, and the images with a src."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, list[str]] = {}
        self.images = 0
        self._table: str | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "table" and a.get("id"):
            self._table = a["id"]
            self.rows[self._table] = []
        elif tag == "tr" and self._table and "data-model" in a:
            self.rows[self._table].append(a["data-model"])
        elif tag == "img" and (a.get("src") or "").startswith("data:image/png;base64,"):
            self.images += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = None


def chromium(binary: str, profile: Path, *args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([binary, *FLAGS, f"--user-data-dir={profile}", *args], check=False,
                          capture_output=True, text=True, timeout=timeout)


def check_dom(dom: str, expected_images: int) -> list[str]:
    """Problems with the rendered DOM (empty when it is fine)."""
    parser = Rows()
    parser.feed(dom)
    problems = [f"the DOM has no table {t}" for t in TABLES if t not in parser.rows]
    models = parser.rows.get("table-models", [])
    if not models and "table-models" in parser.rows:
        problems.append("the models table has no rows")
    for t in TABLES[1:]:
        if t in parser.rows and parser.rows[t] != models:
            problems.append(f"{t} has rows {parser.rows[t]}, expected one per model {models}")
    if parser.images != expected_images:
        problems.append(f"the DOM has {parser.images} embedded images, the file {expected_images}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", type=Path)
    ap.add_argument("--screenshot", type=Path, help="also save a 1400x3000 screenshot here")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args(argv)
    if not args.report.is_file():
        print(f"check_report: {args.report} does not exist", file=sys.stderr)
        return 2
    if not Path(args.chromium).exists():
        print(f"check_report: no Chromium at {args.chromium}; install it (apt-get install chromium)", file=sys.stderr)
        return 2
    url = args.report.resolve().as_uri()
    source = Rows()
    source.feed(args.report.read_text(encoding="utf-8", errors="replace"))
    with tempfile.TemporaryDirectory(prefix="check-report-") as tmp:
        try:
            dump = chromium(args.chromium, Path(tmp) / "profile-dom", "--dump-dom", url)
        except subprocess.TimeoutExpired:
            print("check_report: FAIL: Chromium did not finish --dump-dom in time")
            return 1
        if dump.returncode != 0 or "<html" not in dump.stdout:
            print(f"check_report: FAIL: Chromium exited {dump.returncode}\n{dump.stderr[-2000:]}")
            return 1
        problems = check_dom(dump.stdout, source.images)
        if args.screenshot:
            args.screenshot.parent.mkdir(parents=True, exist_ok=True)
            try:
                shot = chromium(args.chromium, Path(tmp) / "profile-shot", f"--screenshot={args.screenshot.resolve()}",
                                "--window-size=1400,3000", url)
            except subprocess.TimeoutExpired:
                shot = None
            if shot is None or shot.returncode != 0 or not args.screenshot.is_file() or \
                    not args.screenshot.read_bytes().startswith(PNG_SIGNATURE):
                problems.append("Chromium wrote no screenshot" + (f": {shot.stderr[-1000:]}" if shot else " in time"))
    if problems:
        print("check_report: FAIL\n" + "\n".join(f"  {p}" for p in problems))
        return 1
    print(f"check_report: OK: {len(TABLES)} tables, {source.images} images rendered from {args.report}"
          + (f"; screenshot {args.screenshot}" if args.screenshot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
