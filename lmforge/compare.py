"""`lmforge compare --against REV`: the workspace's metrics against a git revision, with tolerances.

    lmforge compare --against main                   # table on stdout, report in paths.gate_report
    lmforge compare --against v1.2 --report out.md   # exit 1 when a gated metric regressed

Run from the repo root. The values come from DVC (`metrics diff` and `params diff` of REV against the
workspace), so they are the committed metrics files at REV and the files on disk now. Each metric of
``gate.tolerances`` (a dotted key of ``paths.eval_metrics``) is judged with the workspace's params:
worse than the baseline by more than max(abs, rel * |baseline|) is a regression. A gated metric
missing in the workspace fails; one missing at REV (a first baseline) passes with a note. Every
other changed metric of every metrics file is listed, not gated.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from lmforge.common import UserError, is_number
from lmforge.params import Tolerance, load_params

FAILING = ("regressed", "missing in workspace")
OK = ("improved", "unchanged", "within tolerance")
EPS = 1e-9  # 0.85 - 0.84 is 0.010000000000000009: float noise must not turn "within" into "regressed"


def allowed_worsening(tol: Tolerance, baseline: float) -> float:
    return max(tol.abs, tol.rel * abs(baseline))


def judge(old: object, new: object, tol: Tolerance) -> str:
    """The verdict on one gated metric, from its baseline (old) and workspace (new) values."""
    if not is_number(new):
        return "missing in workspace"
    if not is_number(old):
        return "missing in baseline"
    worse = old - new if tol.direction == "higher" else new - old  # > 0: moved the wrong way
    if worse < 0:
        return "improved"
    if worse == 0:
        return "unchanged"
    return "within tolerance" if worse <= allowed_worsening(tol, old) + EPS else "regressed"


def tolerance_text(tol: Tolerance, old: object) -> str:
    """How far the metric may move the wrong way: ``-0.01`` (higher is better), ``+0.05 (10%)``."""
    sign = "-" if tol.direction == "higher" else "+"
    if not is_number(old):  # no baseline to take a share of: state the rule
        rule = [f"{sign}{tol.abs:g}"] if tol.abs or not tol.rel else []
        return " / ".join(rule + ([f"{sign}{tol.rel:.0%}"] if tol.rel else []))
    allowed = allowed_worsening(tol, old)
    share = f" ({tol.rel:.0%})" if tol.rel and tol.rel * abs(old) > tol.abs else ""
    return f"{sign}{allowed:.4g}{share}"


@dataclass(frozen=True)
class Row:
    metric: str
    old: object
    new: object
    tolerance: str  # empty: not gated
    verdict: str

    @property
    def delta(self) -> float | None:
        return self.new - self.old if is_number(self.old) and is_number(self.new) else None

    @property
    def marker(self) -> str:
        return "FAIL" if self.verdict in FAILING else "PASS" if self.verdict in OK else "INFO"


def gated_rows(eval_diff: dict[str, dict], tolerances: dict[str, Tolerance]) -> list[Row]:
    """One row per tolerance; eval_diff is DVC's ``{key: {"old", "new"}}`` for the eval metrics file."""
    rows = []
    for key, tol in tolerances.items():
        entry = eval_diff.get(key, {})
        old, new = entry.get("old"), entry.get("new")
        rows.append(Row(key, old, new, tolerance_text(tol, old), judge(old, new, tol)))
    return rows


def info_rows(diff: dict[str, dict[str, dict]], eval_file: str, gated: set[str]) -> list[Row]:
    """Every other metric whose value changed, in any metrics file: listed, not judged."""
    rows = []
    for file, entries in sorted(diff.items()):
        for key, entry in sorted(entries.items()):
            if (file == eval_file and key in gated) or entry.get("old") == entry.get("new"):
                continue
            name = key if file == eval_file else f"{file}:{key}"
            rows.append(Row(name, entry.get("old"), entry.get("new"), "", "not gated"))
    return rows


def fmt(value: object, signed: bool = False) -> str:
    if value is None:
        return "-"
    if is_number(value):
        return f"{value:+.6g}" if signed else f"{value:.6g}"
    return str(value)


def table(rows: list[Row]) -> str:
    """The stdout table: fixed-width columns, one metric per line."""
    head = ("metric", "baseline", "workspace", "delta", "tolerance", "verdict", "")
    cells = [head] + [(r.metric, fmt(r.old), fmt(r.new), fmt(r.delta, signed=True), r.tolerance,
                       r.verdict, r.marker) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells)
    return "\n".join(line.rstrip() for line in lines)


def summary(rows: list[Row], rev: str) -> str:
    failed = [r.metric for r in rows if r.marker == "FAIL"]
    if failed:
        return f"FAIL: {len(failed)} gated metric(s) worse than {rev} beyond tolerance: {', '.join(failed)}"
    return f"PASS: no gated metric regressed beyond tolerance against {rev}"


def markdown_table(head: list[str], rows: list[list[str]]) -> list[str]:
    cell = lambda s: str(s).replace("|", "\\|")  # noqa: E731 - a '|' inside a value splits a cell
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]


def report(rev: str, rev_sha: str, workspace: str, rows: list[Row], params_diff: dict,
           errors: list[str], plots: str) -> str:
    """The Markdown report: revisions, verdict, params diff, metrics table, plots link."""
    lines = [f"# Compare: workspace against `{rev}`", "",
             f"- baseline: `{rev}` ({rev_sha[:12]})", f"- workspace: {workspace}",
             f"- verdict: **{summary(rows, f'`{rev}`')}**", "", "## Params", ""]
    changed = [[(k if f == "params.yaml" else f"{f}:{k}"), fmt(e.get("old")), fmt(e.get("new"))]
               for f, entries in sorted(params_diff.items()) for k, e in sorted(entries.items())]
    lines += markdown_table(["param", rev, "workspace"], changed) if changed else ["No params changed."]
    lines += ["", "## Metrics", ""]
    lines += markdown_table(
        ["metric", "baseline", "workspace", "delta", "tolerance", "verdict", "result"],
        [[r.metric, fmt(r.old), fmt(r.new), fmt(r.delta, True), r.tolerance or "-", r.verdict,
          r.marker] for r in rows])
    if errors:
        lines += ["", "Metrics files DVC could not read:", ""] + [f"- {e}" for e in errors]
    return "\n".join([*lines, "", "## Plots", "", plots, ""])


def read_errors(errors: dict) -> list[str]:
    """DVC's read errors, one line per file and problem, naming the revisions (12-char shas)."""
    revs_of: dict[tuple[str, str], list[str]] = {}
    for rev, err in errors.items():
        items = err.items() if isinstance(err, dict) else [("(every file)", err)]
        for file, e in items:  # not found: a revision before that stage existed, or never run
            what = "not found" if isinstance(e, FileNotFoundError) else f"{type(e).__name__}: {e}"
            revs_of.setdefault((file, what), []).append(rev[:12])
    return [f"{file}: {what} ({', '.join(revs)})" for (file, what), revs in revs_of.items()]


def render_plots(rev: str, out: Path) -> str:
    """`dvc plots diff REV -o out`; a Markdown link to its index.html, or why there is none.

    ``out`` sits next to the report (``reports/gate_plots/`` for ``reports/gate.md``), so the link
    is relative, and a report written at the repo root never writes into the pipeline's ``plots/``.
    """
    index = out / "index.html"
    cmd = [sys.executable, "-m", "dvc", "plots", "diff", rev, "-o", str(out)]
    try:
        out.mkdir(parents=True, exist_ok=True)  # DVC 3.67 fails on an -o folder that is not there
        index.unlink(missing_ok=True)  # a stale page must not pass for this comparison's
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"Plots not rendered: {err}"
    if done.returncode != 0 or not index.exists():
        said = (done.stderr + done.stdout).splitlines()
        why = [line for line in said if line.startswith("ERROR")] or said or [f"exit {done.returncode}"]
        return f"Plots not rendered: `dvc plots diff` said: {why[0]}"
    return f"[`dvc plots diff`]({out.name}/index.html): curves, confusion matrix, per-class table."


def dvc_diffs(rev: str) -> tuple[str, str, dict, dict]:
    """Resolve REV, then DVC's metrics diff (unchanged entries too) and params diff against it.

    Returns (REV's commit, the workspace's description, metrics diff result, params diff).
    """
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo
    from dvc.scm import NoSCM, RevError, resolve_rev

    try:
        repo = Repo(".")
    except NotDvcRepoError:
        raise UserError("not inside a DVC repository: run `lmforge compare` from the repo root") from None
    with repo:
        if isinstance(repo.scm, NoSCM):
            raise UserError("the DVC repository is not in git: there is no revision to compare to")
        try:
            sha = resolve_rev(repo.scm, rev)  # also a `dvc exp` name
        except RevError:
            raise UserError(f"unknown revision '{rev}' (a branch, tag, commit or experiment)") from None
        dirty = " + uncommitted changes" if repo.scm.is_dirty(untracked_files=False) else ""
        workspace = f"{repo.scm.get_rev()[:12]}{dirty}"
        metrics = repo.metrics.diff(a_rev=sha, b_rev="workspace", all=True)
        params = repo.params.diff(a_rev=sha, b_rev="workspace")
    return sha, workspace, metrics, params.get("diff", {})


def run(args) -> int:
    """Compare, print the table, write the report; 1 when a gated metric regressed, else 0."""
    params = load_params()
    out = Path(args.report) if args.report else params.paths.gate_report
    rev_sha, workspace, metrics, params_diff = dvc_diffs(args.against)
    diff = metrics.get("diff", {})
    eval_file = params.paths.eval_metrics.as_posix()
    tolerances = params.gate.tolerances
    rows = gated_rows(diff.get(eval_file, {}), tolerances)
    rows += info_rows(diff, eval_file, set(tolerances))
    errors = read_errors(metrics.get("errors", {}))
    plots = render_plots(rev_sha, out.parent / f"{out.stem}_plots")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report(args.against, rev_sha, workspace, rows, params_diff, errors, plots))
    print(table(rows))
    for line in errors:
        print(f"warning: {line}", file=sys.stderr)
    print(f"\n{summary(rows, args.against)}\nreport: {out}")
    return 1 if any(r.marker == "FAIL" for r in rows) else 0
