"""The helpers every stage shares: one atomic folder swap, one rounding rule, one number check."""

from __future__ import annotations

import pytest

from lmforge.common import is_number, replace_dir, rounded


def test_replace_dir_swaps_a_complete_folder_in(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with replace_dir(dest) as staging:
        assert staging.parent == dest.parent and staging != dest
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
