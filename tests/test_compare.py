"""`lmforge compare --against REV`: verdicts on plain numbers, then DVC diffs in a small git repo."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge import compare
from lmforge.common import UserError
from lmforge.compare import Row, judge
from lmforge.params import Tolerance
from tests.conftest import REPO

HIGHER = Tolerance(direction="higher", abs=0.01)
LOWER_REL = Tolerance(direction="lower", rel=0.1)


# --- verdicts, pure -------------------------------------------------------------------------------

@pytest.mark.parametrize(("old", "new", "tol", "verdict"), [
    (0.85, 0.90, HIGHER, "improved"),
    (0.85, 0.85, HIGHER, "unchanged"),
    (0.85, 0.845, HIGHER, "within tolerance"),
    (0.85, 0.84, HIGHER, "within tolerance"),  # exactly the tolerance, despite float noise
    (0.85, 0.8399, HIGHER, "regressed"),
    (0.50, 0.40, LOWER_REL, "improved"),  # lower is better
    (0.50, 0.55, LOWER_REL, "within tolerance"),  # 10% of 0.5
    (0.50, 0.56, LOWER_REL, "regressed"),
    (None, 0.85, HIGHER, "missing in baseline"),
    (0.85, None, HIGHER, "missing in workspace"),
    (None, None, HIGHER, "missing in workspace"),
    (0.85, "n/a", HIGHER, "missing in workspace"),
])
def test_judge(old, new, tol, verdict):
    assert judge(old, new, tol) == verdict


def test_allowed_worsening_is_the_larger_of_abs_and_rel():
    both = Tolerance(direction="higher", abs=0.01, rel=0.1)
    assert compare.allowed_worsening(both, 0.05) == 0.01  # 10% of 0.05 is less than abs
    assert compare.allowed_worsening(both, 0.5) == pytest.approx(0.05)  # rel wins
    assert judge(0.5, 0.46, both) == "within tolerance"
    assert judge(0.05, 0.035, both) == "regressed"
    assert compare.allowed_worsening(Tolerance(direction="lower", rel=0.1), -2.0) == pytest.approx(0.2)


def test_tolerance_text_shows_direction_and_where_it_comes_from():
    assert compare.tolerance_text(HIGHER, 0.85) == "-0.01"
    assert compare.tolerance_text(LOWER_REL, 0.5) == "+0.05 (10%)"
    assert compare.tolerance_text(LOWER_REL, None) == "+10%"
    assert compare.tolerance_text(Tolerance(direction="higher"), None) == "-0"


def test_rows_markers_and_exit_relevant_failures():
    diff = {"accuracy": {"old": 0.85, "new": 0.80, "diff": -0.05},
            "loss": {"old": 0.5, "new": 0.52, "diff": 0.02}}
    tols = {"accuracy": HIGHER, "loss": LOWER_REL, "f1_macro": HIGHER}
    rows = compare.gated_rows(diff, tols)
    assert [(r.metric, r.verdict, r.marker) for r in rows] == [
        ("accuracy", "regressed", "FAIL"), ("loss", "within tolerance", "PASS"),
        ("f1_macro", "missing in workspace", "FAIL")]
    assert rows[0].delta == pytest.approx(-0.05) and rows[2].delta is None
    assert Row("x", None, 1.0, "-0.01", "missing in baseline").marker == "INFO"
    assert "FAIL: 2 gated metric(s) worse than main beyond tolerance: accuracy, f1_macro" == (
        compare.summary(rows, "main"))


def test_info_rows_list_other_changed_metrics_only():
    diff = {
        "metrics/eval.json": {"accuracy": {"old": 0.8, "new": 0.9}, "n": {"old": 9, "new": 9},
                              "per_class.a.f1": {"old": 0.7, "new": 0.6}},
        "metrics/train.json": {"wall_s": {"old": 10, "new": 12}},
        "metrics/gate.json": {"passed": {"old": True, "new": True}},
    }
    rows = compare.info_rows(diff, "metrics/eval.json", {"accuracy"})
    assert [(r.metric, r.verdict, r.marker) for r in rows] == [
        ("per_class.a.f1", "not gated", "INFO"), ("metrics/train.json:wall_s", "not gated", "INFO")]


def test_markdown_report_has_revisions_params_metrics_and_plots():
    rows = [Row("accuracy", 0.85, 0.8, "-0.01", "regressed")]
    text = compare.report("main", "a" * 40, "bbbbbbbbbbbb + uncommitted changes", rows,
                          {"params.yaml": {"train.seed": {"old": 1, "new": 2}}}, ["main: x"], "LINK")
    assert "# Compare: workspace against `main`" in text and "aaaaaaaaaaaa" in text
    assert "| train.seed | 1 | 2 |" in text
    assert "| accuracy | 0.85 | 0.8 | -0.05 | -0.01 | regressed | FAIL |" in text
    assert "- main: x" in text and text.rstrip().endswith("LINK")
    assert "No params changed." in compare.report("main", "a" * 40, "b", rows, {}, [], "")


def test_read_errors_are_one_line_per_file_and_problem():
    errors = {"a" * 40: {"metrics/gate.json": FileNotFoundError(2, "No such file")},
              "workspace": {"metrics/gate.json": FileNotFoundError(2, "No such file"),
                            "metrics/eval.json": ValueError("corrupted")}}
    assert compare.read_errors(errors) == [
        "metrics/gate.json: not found (aaaaaaaaaaaa, workspace)",
        "metrics/eval.json: ValueError: corrupted (workspace)"]


# --- end to end: DVC's diffs in a temporary git repo ----------------------------------------------

BASE_EVAL = {"accuracy": 0.85, "f1_macro": 0.8, "f1_weighted": 0.84, "n": 161, "loss": 0.5,
             "per_class": {"negative": {"f1": 0.8}, "positive": {"f1": 0.82}}}


def write(root: Path, rel: str, obj) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root,
                   check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    """The real dvc.yaml and params.yaml, metrics written by hand and committed on main."""
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy2(REPO / name, root / name)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    shutil.copy2(REPO / ".dvc/config", root / ".dvc/config")  # the offline plots page
    shutil.copy2(REPO / ".dvc/plots-template.html", root / ".dvc/plots-template.html")
    write(root, "metrics/eval.json", BASE_EVAL)
    write(root, "metrics/train.json", {"best_val_accuracy": 0.8, "wall_s": 10.0})
    write(root, "plots/train/val.csv", "epoch,val_accuracy\n0,0.7\n1,0.8\n")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "baseline")
    monkeypatch.chdir(root)
    return root


def compare_args(against: str = "main", report: str | None = None) -> argparse.Namespace:
    return argparse.Namespace(against=against, report=report)  # what lmforge/cli.py passes


def test_regression_and_deleted_metric_fail_with_a_report(repo, capsys):
    worse = {k: v for k, v in BASE_EVAL.items() if k != "f1_macro"}
    write(repo, "metrics/eval.json", {**worse, "accuracy": 0.8})
    write(repo, "metrics/train.json", {"best_val_accuracy": 0.8, "wall_s": 12.5})
    write(repo, "plots/train/val.csv", "epoch,val_accuracy\n0,0.6\n1,0.75\n")
    params = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(params.replace("learning_rate: 1.0e-4", "learning_rate: 3.0e-4"))

    assert compare.run(compare_args()) == 1
    out = capsys.readouterr().out
    assert "regressed" in out and "FAIL: 2 gated metric(s)" in out

    text = (repo / "reports/gate.md").read_text()
    assert "| accuracy | 0.85 | 0.8 | -0.05 | -0.01 | regressed | FAIL |" in text
    assert "| f1_macro | 0.8 | - | - | -0.01 | missing in workspace | FAIL |" in text
    assert "| loss | 0.5 | 0.5 | +0 | +0.05 (10%) | unchanged | PASS |" in text
    assert "| metrics/train.json:wall_s | 10 | 12.5 | +2.5 | - | not gated | INFO |" in text
    assert "| train.learning_rate | 0.0001 | 0.0003 |" in text
    assert "+ uncommitted changes" in text
    assert "(gate_plots/index.html)" in text and (repo / "reports/gate_plots/index.html").is_file()
    page = (repo / "reports/gate_plots/index.html").read_text()
    assert "vegaEmbed('#" in page and "cdn.jsdelivr" not in page  # vega inline: renders offline


def test_improvement_passes_and_report_path_is_honoured(repo, capsys):
    write(repo, "metrics/eval.json", {**BASE_EVAL, "accuracy": 0.9, "loss": 0.54})
    git(repo, "checkout", "-qb", "better")
    git(repo, "commit", "-qam", "better model")

    assert compare.run(compare_args(report="out/cmp.md")) == 0
    assert "PASS: no gated metric regressed" in capsys.readouterr().out
    text = (repo / "out/cmp.md").read_text()
    assert "| accuracy | 0.85 | 0.9 | +0.05 | -0.01 | improved | PASS |" in text
    assert "| loss | 0.5 | 0.54 | +0.04 | +0.05 (10%) | within tolerance | PASS |" in text
    assert "No params changed." in text and "uncommitted" not in text
    assert "(cmp_plots/index.html)" in text and (repo / "out/cmp_plots/index.html").is_file()


def test_unknown_revision_is_a_user_error(repo):
    with pytest.raises(UserError, match="unknown revision 'nope'"):
        compare.run(compare_args("nope"))
    assert not (repo / "reports/gate.md").exists()


def test_console_script_exit_statuses(repo):
    lmforge = Path(sys.executable).parent / "lmforge"
    write(repo, "metrics/eval.json", {**BASE_EVAL, "loss": 0.7})  # +40%: beyond 10%
    run = subprocess.run([str(lmforge), "compare", "--against", "main"], cwd=repo,
                         capture_output=True, text=True)
    assert run.returncode == 1, run.stderr
    assert "loss" in run.stdout and "regressed" in run.stdout and "is now" not in run.stderr
    bad = subprocess.run([str(lmforge), "compare", "--against", "no-such-branch"], cwd=repo,
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert "error: unknown revision 'no-such-branch'" in bad.stderr and "Traceback" not in bad.stderr
    # The old name still works, and says it is old.
    old = subprocess.run([str(lmforge), "gate", "--against", "main"], cwd=repo,
                         capture_output=True, text=True)
    assert old.returncode == 1 and old.stdout == run.stdout
    assert "`lmforge gate` is now `lmforge compare`" in old.stderr


def test_plots_that_cannot_be_rendered_are_reported_not_fatal(repo):
    write(repo, "reports/gate_plots", "a file where the plots folder goes")
    assert compare.run(compare_args()) == 0  # nothing changed
    text = (repo / "reports/gate.md").read_text()
    assert "Plots not rendered:" in text and "reports/gate_plots" in text
    assert "| accuracy | 0.85 | 0.85 | +0 | -0.01 | unchanged | PASS |" in text
