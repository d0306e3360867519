"""The validation summary: stage validate's checks on one self-contained HTML page.

Written beside the Great Expectations Data Docs (``paths.data_docs/summary.html``) from the report
the stage already has: a row per check under the name the terminal prints (``train/text_not_null``),
PASSED or FAILED in words and in colour, the unexpected count, the expectation, its column and
bounds, examples (a class-balance row names its class) and any error; failed checks first. No script
and no external style: it reads the same with no network, where the Data Docs' index (a table drawn
by a script from a CDN) is empty.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

SUMMARY = "summary.html"
STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px; color: #1b1b1b; }
h1 { font-size: 20px; margin: 0 0 8px; }
h1.failed { color: #b71c1c; } h1.passed { color: #1b5e20; }
table { border-collapse: collapse; margin-top: 12px; }
th, td { border: 1px solid #d0d0d0; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #eeeeee; }
tr.failed { background: #fdecea; }
.verdict { display: inline-block; min-width: 4.5em; text-align: center; font-weight: bold;
           border-radius: 3px; padding: 1px 6px; color: #ffffff; }
tr.failed .verdict { background: #c62828; } tr.passed .verdict { background: #2e7d32; }
td.count { text-align: right; font-variant-numeric: tabular-nums; }
td.examples { min-width: 16em; max-width: 44em; overflow-wrap: anywhere; }
code { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px; }
"""
COLUMNS = ("check", "result", "unexpected", "expectation", "column", "expected", "examples", "error")


def shown(value, limit: int = 120) -> str:
    """A value as the terminal shows it (repr), cut when long, with its length said."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 20]}... ({len(str(value))} chars)"


def cell(text: str, css: str = "") -> str:
    return f'<td class="{css}">{text}</td>' if css else f"<td>{text}</td>"


def row(name: str, check: dict) -> str:
    """One <tr>: every field escaped, the verdict as a word and a class that colours it."""
    verdict = "passed" if check["success"] else "failed"
    examples = dict.fromkeys(map(shown, check.get("examples") or []))  # a repeated text once
    expected = ", ".join(f"{k}={shown(v)}" for k, v in (check.get("expected") or {}).items())
    cells = [
        cell(f"<code>{escape(name)}</code>"),
        cell(f'<span class="verdict">{verdict.upper()}</span>'),
        cell(str(check["unexpected_count"]), "count"),
        cell(escape(check["expectation"] or "")),
        cell(escape(check["column"] or "")),
        cell(escape(expected)),
        cell("<br>".join(f"<code>{escape(e)}</code>" for e in examples), "examples"),
        cell(escape(check["error"] or "")),
    ]
    return f'<tr class="{verdict}">{"".join(cells)}</tr>'


def summary_html(report: dict) -> str:
    """The page for a run_suite report (stages/validate.py): failed checks first, then passed."""
    checks = report["checks"]
    failed = report["checks_failed"]
    verdict = f"FAILED: {failed} of {len(checks)} checks" if failed else (
        f"PASSED: all {len(checks)} checks")
    ordered = sorted(checks.items(), key=lambda item: item[1]["success"])  # stable: report order
    labels = report.get("label_set")
    about = [f"Labels: {escape(', '.join(map(str, labels)))}." if labels else "",
             "Every check of stage validate, named as the terminal names it. The Great Expectations "
             'Data Docs (each expectation in full) are in <a href="index.html">index.html</a>.']
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>Validation {verdict}</title>",
        f"<style>{STYLE}</style>",
        "</head>",
        "<body>",
        f'<h1 class="{"failed" if failed else "passed"}">Validation {verdict}</h1>',
        f"<p>{' '.join(filter(None, about))}</p>",
        "<table>",
        "<thead><tr>" + "".join(f"<th>{c}</th>" for c in COLUMNS) + "</tr></thead>",
        "<tbody>",
        *(row(name, check) for name, check in ordered),
        "</tbody>",
        "</table>",
        "</body>",
        "</html>",
        "",
    ])


def write_summary(report: dict, folder: Path) -> Path:
    """Write ``folder/summary.html`` for ``report``; its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SUMMARY
    path.write_text(summary_html(report), encoding="utf-8")
    return path
