"""The local engine streams: any batch size gives the splits, manifest and validation report of one
whole-table pass (lmforge/data/local.py, stages/validate.py run_batched)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lmforge.common import UserError
from lmforge.data import local
from lmforge.data.hashing import SeenRows, row_hashes
from lmforge.data.shards import read_batches, split_path
from lmforge.params import parse_params
from stages import ingest, validate

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample"
SPLITS = ("train", "validation", "test")


def params_for(tmp_path: Path, name: str, source: Path, task: str = "classification", **data):
    extra = {"model": {"source": "scratch"}, "train": {"early_stopping": {"monitor": "val_loss",
             "mode": "min"}}, "gate": {"floors": {}, "tolerances": {}}} if task == "causal_lm" else {}
    root = tmp_path / name
    return parse_params({"task": task, "data": {"source": str(source), **data}, **extra, "paths": {
        "raw": str(root / "raw"), "interim": str(root / "interim"),
        "manifest": str(root / "data.json"), "data_docs": str(root / "docs"),
        "validation": str(root / "validation.json")}})


def splits_of(params) -> dict[str, pd.DataFrame]:
    return {s: pd.read_parquet(split_path(params.paths.interim, s)) for s in SPLITS}


CASES = {
    "classification csv": ("reviews.csv", "classification", {}),
    "classification by hash": ("reviews.csv", "classification", {"split": {"method": "hash"}}),
    "plain text documents": ("stories.txt", "causal_lm", {}),
    "plain text lines": ("stories.txt", "causal_lm", {"text_unit": "line"}),
    "pairs": ("pairs.csv", "causal_lm", {"prompt_column": "prompt", "response_column": "response"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_any_batch_size_gives_the_splits_and_manifest_of_one_batch(tmp_path, monkeypatch, case):
    file, task, data = CASES[case]
    monkeypatch.setattr(local, "PART_ROWS", 40)  # several part files per split, too
    whole = params_for(tmp_path, "whole", SAMPLE / file, task, batch_rows=100_000, **data)
    small = params_for(tmp_path, "small", SAMPLE / file, task, batch_rows=7, **data)
    assert ingest.main(whole) == ingest.main(small)
    a, b = splits_of(whole), splits_of(small)
    for split in SPLITS:
        pd.testing.assert_frame_equal(a[split], b[split])
        assert len(list(split_path(small.paths.interim, split).glob("part-*.parquet"))) == \
            -(-len(b[split]) // 40)
    assert sum(map(len, a.values())) > 100


def test_duplicates_across_batches_are_dropped_and_counted(tmp_path):
    rows = pd.DataFrame({"text": [f"review {i % 30}" for i in range(90)],
                         "label": ["pos" if i % 2 else "neg" for i in range(30)] * 3})
    src = tmp_path / "dups.csv"
    rows.to_csv(src, index=False)
    manifest = ingest.main(params_for(tmp_path, "run", src, batch_rows=8))
    assert manifest["rows"]["total"] == 30
    assert manifest["dropped"] == {"source": {"empty": 0, "duplicate": 60}}


def test_labels_that_mix_numbers_and_strings_across_batches_are_refused(tmp_path):
    rows = pd.DataFrame({"text": [f"t{i}" for i in range(20)], "label": ["1"] * 10 + ["pos"] * 10})
    src = tmp_path / "mixed.csv"
    rows.to_csv(src, index=False)
    with pytest.raises(UserError, match=r"mixes numbers and strings \(10 numeric, 10 text"):
        ingest.main(params_for(tmp_path, "run", src, batch_rows=10))


def test_a_hash_split_keeps_each_row_where_it_was_when_rows_are_added(tmp_path):
    texts = [f"sentence number {i}" for i in range(3000)]
    labels = ["a", "b", "c"] * 1000
    first, more = tmp_path / "first.csv", tmp_path / "more.csv"
    pd.DataFrame({"text": texts[:2000], "label": labels[:2000]}).to_csv(first, index=False)
    pd.DataFrame({"text": texts, "label": labels}).to_csv(more, index=False)
    runs = []
    for name, src in (("first", first), ("more", more)):
        params = params_for(tmp_path, name, src, split={"method": "hash"}, batch_rows=500)
        ingest.main(params)
        runs.append({t: s for s, df in splits_of(params).items() for t in df["text"]})
    assert all(runs[1][t] == s for t, s in runs[0].items())
    shares = pd.Series(runs[1]).value_counts(normalize=True)
    assert abs(shares["validation"] - 0.1) < 0.02 and abs(shares["test"] - 0.1) < 0.02


def broken_splits() -> dict[str, pd.DataFrame]:
    """Splits with repeats, leakage, blank and over-long texts, and a label outside the set."""
    rng = np.random.default_rng(0)
    train = pd.DataFrame({"text": [f"train text {i}" for i in range(60)] + ["train text 3"] * 5,
                          "label": rng.choice(["a", "b"], 65).tolist()})
    texts = ["train text 1", "fine", " ", "x" * 6000] + [f"v{i}" for i in range(20)]
    validation = pd.DataFrame({"text": texts,
                               "label": ["a", "b", "a", "zzz"] + ["a"] * 20})
    test = pd.DataFrame({"text": [f"test {i}" for i in range(30)] + ["test 2"] * 3, "label": ["b"] * 33})
    return {"train": train, "validation": validation, "test": test}


def test_validate_batch_by_batch_reports_what_one_pass_reports(tmp_path):
    frames = broken_splits()
    params = params_for(tmp_path, "run", tmp_path / "unused.csv", batch_rows=6)
    for split, df in frames.items():
        folder = split_path(params.paths.interim, split)
        folder.mkdir(parents=True)
        for i in range(0, len(df), 10):  # several parts, and batches that cross them
            df.iloc[i : i + 10].astype("string").to_parquet(folder / f"part-{i:05d}.parquet", index=False)
    frames = {s: pd.read_parquet(split_path(params.paths.interim, s)) for s in SPLITS}
    whole = validate.run_suite(frames, params)
    batched = validate.run_batched(params.paths.interim, params, tmp_path / "docs")
    assert not whole["success"] and whole["checks_failed"] >= 4
    assert list(batched["checks"]) == list(whole["checks"])
    for name, check in whole["checks"].items():
        got = batched["checks"][name]
        assert got["success"] == check["success"], name
        assert got["unexpected_count"] == check["unexpected_count"], name
        assert set(got["examples"]) == set(check["examples"]), name
    assert batched["label_set"] == whole["label_set"]
    assert (tmp_path / "docs" / "index.html").exists()


def test_validate_stage_checks_large_splits_in_batches(tmp_path, monkeypatch):
    params = params_for(tmp_path, "run", SAMPLE / "reviews.csv", batch_rows=300)
    ingest.main(params)
    seen = []
    monkeypatch.setattr(validate, "run_suite", lambda *a, **k: seen.append("whole"))
    report = validate.main(params)
    assert report["success"] and seen == []  # 1,278 train rows > 300: run_batched did the work


def test_read_batches_gives_every_row_once_in_order(tmp_path):
    df = pd.DataFrame({"n": range(95)})
    folder = tmp_path / "x.parquet"
    folder.mkdir()
    for i in range(0, 95, 30):
        df.iloc[i : i + 30].to_parquet(folder / f"part-{i:05d}.parquet", index=False)
    got = list(read_batches(folder, 20))
    assert all(len(b) <= 20 for b in got)
    assert pd.concat(got)["n"].tolist() == list(range(95))


def test_seen_rows_marks_repeats_within_and_across_batches():
    seen = SeenRows()
    a = row_hashes(pd.DataFrame({"t": ["x", "y", "x", None]}), ["t"])
    b = row_hashes(pd.DataFrame({"t": ["y", "z", None, ""]}), ["t"])
    assert seen.first_seen(a).tolist() == [True, True, False, True]
    assert seen.first_seen(b).tolist() == [False, True, False, True]  # null and "" differ
    assert len(seen) == 5  # x, y, null, z, ""


def test_tokenizing_in_several_processes_gives_the_same_dataset(tiny_model_dir):
    from transformers import AutoTokenizer

    from lmforge.classification.data import tokenize_split

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    df = pd.DataFrame({"text": [f"the item {i % 100} is good and cheap" for i in range(400)],
                       "labels": [i % 2 for i in range(400)]})
    one = tokenize_split(df, tokenizer, max_length=16, batch_size=50)
    two = tokenize_split(df, tokenizer, max_length=16, batch_size=50, num_proc=2)
    assert one.to_dict() == two.to_dict() and len(one) == 400
