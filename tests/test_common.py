"""The helpers every stage shares: one atomic folder swap, one rounding rule, one number check."""

from __future__ import annotations

import pytest

from lmforge.common import FAIL_ENV, is_number, replace_dir, rounded, write_aside, write_json


def test_replace_dir_swaps_a_complete_folder_in(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with replace_dir(dest) as staging:
        assert staging.name == dest.name and staging.parent.parent == dest.parent  # same disk
        (staging / "new.txt").write_text("new")
        assert (dest / "old.txt").exists()  # nothing changes until the block ends
    assert sorted(p.name for p in dest.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging left behind


def test_replace_dir_leaves_the_old_folder_when_the_block_raises(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "good.txt").write_text("good")
    with pytest.raises(RuntimeError), replace_dir(dest) as staging:
        (staging / "half.txt").write_text("half")
        raise RuntimeError("crash mid-write")
    assert sorted(p.name for p in dest.iterdir()) == ["good.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_replace_dir_creates_a_missing_destination_and_its_parent(tmp_path):
    dest = tmp_path / "a" / "b"
    with replace_dir(dest) as staging:
        (staging / "x").write_text("x")
    assert (dest / "x").read_text() == "x"


def test_a_kill_between_the_renames_is_repaired_before_the_next_write(tmp_path):
    """Killed after dest became .dest.old and before .dest.new became dest: the old comes back."""
    dest = tmp_path / "out"
    (tmp_path / ".out.old").mkdir()
    (tmp_path / ".out.old" / "good.txt").write_text("good")
    (tmp_path / ".out.new").mkdir()
    with pytest.raises(RuntimeError), replace_dir(dest):
        raise RuntimeError("this run fails too")
    assert (dest / "good.txt").read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_rounded_keeps_six_decimals_ints_and_nesting():
    assert rounded({"a": 0.123456789, "n": 3, "d": {"b": 1 / 3}}) == {
        "a": 0.123457, "n": 3, "d": {"b": 0.333333}}


@pytest.mark.parametrize("value, expected", [(1, True), (0.5, True), (True, False), ("1", False),
                                             (None, False)])
def test_is_number_means_a_comparable_metric_value(value, expected):
    assert is_number(value) is expected


def test_write_aside_swaps_files_and_folders_together_or_not_at_all(tmp_path):
    folder, report = tmp_path / "model", tmp_path / "metrics" / "m.json"
    folder.mkdir()
    (folder / "w").write_text("old weights")
    write_json(report, {"v": 1})
    before = report.read_bytes()
    with pytest.raises(ValueError), write_aside(folder, report) as (new_folder, new_report):
        new_folder.mkdir()
        (new_folder / "w").write_text("new weights")
        write_json(new_report, {"v": 2})
        raise ValueError("the stage fails after writing everything aside")
    assert (folder / "w").read_text() == "old weights" and report.read_bytes() == before
    with write_aside(folder, report) as (new_folder, new_report):
        new_folder.mkdir()
        (new_folder / "w").write_text("new weights")
        write_json(new_report, {"v": 2})
    assert (folder / "w").read_text() == "new weights" and '"v": 2' in report.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics", "model"]
    assert sorted(p.name for p in report.parent.iterdir()) == ["m.json"]


def test_an_output_not_written_aside_is_left_alone(tmp_path):
    keep = tmp_path / "keep.json"
    write_json(keep, {"k": 1})
    with write_aside(keep, tmp_path / "other.json") as (_, other):
        write_json(other, {"o": 1})
    assert keep.read_text().count('"k": 1') == 1 and (tmp_path / "other.json").exists()


def test_the_injected_failure_fires_for_the_named_output_only(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    write_json(target, {"v": 1})
    monkeypatch.setenv(FAIL_ENV, str(target))
    with pytest.raises(RuntimeError, match="injected failure before writing"):
        write_json(target, {"v": 2})
    with pytest.raises(RuntimeError, match="injected failure"), write_aside(tmp_path / "d", target) as (d, t):
        d.mkdir()
        write_json(t, {"v": 3})
    assert '"v": 1' in target.read_text() and not (tmp_path / "d").exists()
    write_json(tmp_path / "other.json", {})  # any other path writes as usual
