"""Ingest: reading each source kind, cleaning, stratified splitting, the manifest, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from lmforge.common import UserError
from lmforge.data.cleaning import clean_table, labels_as_strings
from lmforge.data.splitting import random_indices, stratified_indices
from lmforge.params import parse_params
from stages import ingest


def test_clean_normalizes_collapses_and_counts_drops():
    data = parse_params({}).data
    df = pd.DataFrame({
        "text": ["ﬁne  product", "fine product", "   ", None, "Ｇood\tone", "Good one", "x"],
        "label": ["a", "a", "a", "b", "b", "b", "a"],
    })
    df["label"] = df["label"].astype("string")
    out, dropped = clean_table(df, data)
    # NFKC folds the ligature and full-width letter, so two pairs become exact duplicates.
    assert list(out["text"]) == ["fine product", "Good one", "x"]
    assert dropped == {"empty": 2, "duplicate": 2}


def test_cleaning_switches_are_respected():
    data = parse_params({"data": {"clean": {
        "unicode_form": None, "collapse_whitespace": False, "drop_empty": False,
        "drop_duplicates": False,
    }}}).data
    df = pd.DataFrame({"text": ["a  b", "a  b", " "], "label": ["x", "x", "y"]})
    out, dropped = clean_table(df, data)
    assert list(out["text"]) == ["a  b", "a  b", " "]
    assert dropped == {"empty": 0, "duplicate": 0}


def test_same_text_with_different_labels_is_not_an_exact_duplicate():
    data = parse_params({}).data
    out, dropped = clean_table(pd.DataFrame({"text": ["t", "t"], "label": ["a", "b"]}), data)
    assert len(out) == 2 and dropped["duplicate"] == 0


def stratified_split(df, label, fractions, seed):
    return {s: df.iloc[i].reset_index(drop=True)
            for s, i in stratified_indices(df[label], fractions, seed).items()}


def random_split(df, fractions, seed):
    return {s: df.iloc[i].reset_index(drop=True) for s, i in random_indices(len(df), fractions, seed).items()}


def test_stratified_split_is_seeded_disjoint_and_keeps_class_shares(rows):
    a = stratified_split(rows, "label", {"validation": 0.25, "test": 0.25}, seed=7)
    b = stratified_split(rows, "label", {"validation": 0.25, "test": 0.25}, seed=7)
    c = stratified_split(rows, "label", {"validation": 0.25, "test": 0.25}, seed=8)
    assert all(a[s].equals(b[s]) for s in a)
    assert not a["test"].equals(c["test"])
    texts = [set(a[s]["text"]) for s in ("train", "validation", "test")]
    assert sum(map(len, texts)) == len(rows) and not (texts[0] & texts[1] or texts[0] & texts[2])
    for split in ("validation", "test"):  # 12 rows per class * 0.25 = 3 of each class
        assert a[split]["label"].value_counts().to_dict() == {"negative": 3, "neutral": 3, "positive": 3}


def test_stratified_split_keeps_a_train_row_for_tiny_classes():
    df = pd.DataFrame({"text": ["a", "b", "c"], "label": ["x", "x", "y"]})
    out = stratified_split(df, "label", {"validation": 0.5, "test": 0.5}, seed=0)
    assert set(out["train"]["label"]) == {"x", "y"}


def test_labels_ints_become_strings_and_mixes_are_refused():
    assert list(labels_as_strings(pd.Series([1, 0, 1]), "t")) == ["1", "0", "1"]
    floats = labels_as_strings(pd.Series([1.0, None, 0.0]), "t")
    assert floats.iloc[0] == "1" and pd.isna(floats.iloc[1])
    with pytest.raises(UserError, match="mixes numbers and strings"):
        labels_as_strings(pd.Series([1, "pos", 0], dtype=object), "train.jsonl")


def _params(tmp_path, source, **data):
    return parse_params({"data": {"source": str(source), **data}, "paths": {
        "raw": str(tmp_path / "raw"), "interim": str(tmp_path / "interim"),
        "manifest": str(tmp_path / "metrics" / "data.json"),
    }})


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_main_reads_each_file_format_and_writes_splits_and_manifest(tmp_path, rows, fmt):
    src = tmp_path / f"reviews.{fmt}"
    if fmt == "csv":
        rows.to_csv(src, index=False)
    elif fmt == "jsonl":
        rows.to_json(src, orient="records", lines=True)
    else:
        rows.to_parquet(src)
    params = _params(tmp_path, src)
    manifest = ingest.main(params)
    # 12 rows per class * 0.1 rounds to 1 per class and split.
    assert manifest["rows"] == {"train": 30, "validation": 3, "test": 3, "total": 36}
    assert (tmp_path / "raw" / src.name).read_bytes() == src.read_bytes()
    saved = json.loads((tmp_path / "metrics" / "data.json").read_text())
    assert saved["source_sha256"] == manifest["source_sha256"] and len(saved["source_sha256"]) == 64
    test = pd.read_parquet(tmp_path / "interim" / "test.parquet")
    assert list(test.columns) == ["text", "label"] and len(test) == 3


def test_main_uses_the_splits_a_folder_provides_and_carves_the_missing_one(tmp_path, rows):
    folder = tmp_path / "src"
    folder.mkdir()
    rows.iloc[:30].to_csv(folder / "train.csv", index=False)
    rows.iloc[30:].to_json(folder / "test.jsonl", orient="records", lines=True)
    manifest = ingest.main(_params(tmp_path, folder))
    assert manifest["rows"]["test"] == 6  # kept as given
    assert manifest["rows"]["validation"] + manifest["rows"]["train"] == 30
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["test.jsonl", "train.csv"]


def test_custom_columns_and_int_labels(tmp_path):
    src = tmp_path / "d.csv"
    pd.DataFrame({"sentence": [f"s {i}" for i in range(40)], "y": [i % 2 for i in range(40)]}).to_csv(
        src, index=False
    )
    manifest = ingest.main(_params(tmp_path, src, text_column="sentence", label_column="y"))
    assert set(manifest["labels"]["train"]) == {"0", "1"}


def test_content_change_changes_the_hash(tmp_path, rows):
    src = tmp_path / "d.csv"
    rows.to_csv(src, index=False)
    first = ingest.main(_params(tmp_path, src))["source_sha256"]
    rows.assign(text=rows["text"] + "!").to_csv(src, index=False)
    assert ingest.main(_params(tmp_path, src))["source_sha256"] != first


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.csv", None, "does not exist"),
        ("empty.csv", b"", "the file is empty"),
        ("data.txt", b"hello\n", "unsupported format '.txt'"),
        ("latin1.csv", "text,label\ncaf\xe9 ok,a\n".encode("latin-1"), "not UTF-8 text"),
        ("cols.csv", b"review,label\nnice,a\n", r"missing column\(s\) \['text'\]"),
    ],
)
def test_bad_sources_fail_with_a_clear_message_and_write_nothing(tmp_path, name, content, message):
    src = tmp_path / name
    if content is not None:
        src.write_bytes(content)
    with pytest.raises(UserError, match=message):
        ingest.main(_params(tmp_path, src))
    assert not (tmp_path / "interim").exists() and not (tmp_path / "raw").exists()


def test_hub_source_offline_fails_clearly(tmp_path):
    with pytest.raises(UserError, match="cannot load from the Hugging Face hub"):
        ingest.main(_params(tmp_path, "hf:some/dataset-that-needs-the-hub"))


# --- task causal_lm ------------------------------------------------------------------------------

def _lm_params(tmp_path, source, **data):
    return parse_params({
        "task": "causal_lm",
        "data": {"source": str(source), **data},
        "paths": {"raw": str(tmp_path / "raw"), "interim": str(tmp_path / "interim"),
                  "manifest": str(tmp_path / "metrics" / "data.json")},
        "model": {"source": "scratch"},
        "train": {"early_stopping": {"monitor": "val_loss", "mode": "min"}},
        "gate": {"floors": {}, "tolerances": {}},
    })


TEXT = "First doc, line one.\nLine  two.\n\n\n  \nSecond doc.\r\n\r\nThird\tdoc\n  indented line\n"


def test_txt_rows_are_documents_or_lines():
    from lmforge.data.sources import text_rows

    def split_text(text, unit):  # as the reader hands lines over: with their line ends
        return list(text_rows(text.splitlines(keepends=True), unit))

    text = TEXT.replace("\r\n", "\n")
    assert split_text(text, "document") == [
        "First doc, line one.\nLine  two.", "Second doc.", "Third\tdoc\n  indented line"]
    assert split_text(text, "line") == [
        "First doc, line one.", "Line  two.", "Second doc.", "Third\tdoc", "  indented line"]


@pytest.mark.parametrize("unit, rows", [("document", 3), ("line", 5)])
def test_main_reads_a_txt_file_per_text_unit(tmp_path, unit, rows):
    src = tmp_path / "corpus.txt"
    src.write_bytes(TEXT.encode())
    params = _lm_params(tmp_path, src, text_unit=unit, split={"validation": 0.2, "test": 0.2})
    manifest = ingest.main(params)
    assert manifest["rows"]["total"] == rows and "labels" not in manifest
    texts = pd.concat(pd.read_parquet(tmp_path / "interim" / f"{s}.parquet") for s in
                      ("train", "validation", "test"))["text"]
    assert manifest["chars"]["total"] == texts.str.len().sum()
    if unit == "document":  # whitespace collapsed and trimmed per line; the line breaks stay
        assert set(texts) == {"First doc, line one.\nLine two.", "Second doc.",
                              "Third doc\nindented line"}
    assert (tmp_path / "raw" / "corpus.txt").read_bytes() == src.read_bytes()


def test_main_reads_a_folder_of_txt_splits(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    for split, n in (("train", 6), ("validation", 2), ("test", 3)):
        (folder / f"{split}.txt").write_text("\n\n".join(f"{split} doc {i}" for i in range(n)))
    manifest = ingest.main(_lm_params(tmp_path, folder))
    assert manifest["rows"] == {"train": 6, "validation": 2, "test": 3, "total": 11}
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == [
        "test.txt", "train.txt", "validation.txt"]


def test_lm_cleaning_drops_empty_and_duplicate_pairs_and_keeps_lines():
    data = _lm_params(Path("."), "x.csv", prompt_column="q", response_column="a").data
    df = pd.DataFrame({"q": ["p1", "p1", "p2", None, "p3", "p4"],
                       "a": ["r1\n  r1b ", "r1\nr1b", "", "r", "r3", "r4"]})
    out, dropped = clean_table(df, data, "causal_lm")
    assert out.to_dict("list") == {"q": ["p1", "p3", "p4"], "a": ["r1\nr1b", "r3", "r4"]}
    assert dropped == {"empty": 2, "duplicate": 1}


def test_random_split_is_seeded_disjoint_and_sized():
    df = pd.DataFrame({"text": [f"t{i}" for i in range(50)]})
    a = random_split(df, {"validation": 0.1, "test": 0.2}, seed=1)
    b = random_split(df, {"validation": 0.1, "test": 0.2}, seed=1)
    c = random_split(df, {"validation": 0.1, "test": 0.2}, seed=2)
    assert all(a[s].equals(b[s]) for s in a) and not a["test"].equals(c["test"])
    assert {s: len(d) for s, d in a.items()} == {"train": 35, "validation": 5, "test": 10}
    assert set().union(*(set(d["text"]) for d in a.values())) == set(df["text"])
    one = random_split(df.iloc[:1], {"validation": 0.5, "test": 0.4}, seed=0)
    assert len(one["train"]) == 1


@pytest.mark.parametrize(
    "name, content, data, message",
    [
        ("pairs.csv", b"prompt,answer\nhi,there\n", {"prompt_column": "prompt",
         "response_column": "response"}, r"missing column\(s\) \['response'\] \(data.response_column\)"),
        ("plain.csv", b"body\nhello\n", {}, r"\['text'\] \(data.text_column\)"),
        ("latin1.txt", "caf\xe9\n".encode("latin-1"), {}, "not UTF-8 text .*line 1"),
        ("blank.txt", b" \n\n\t\n", {}, "holds only whitespace"),
        ("pairs.txt", b"hello\n", {"prompt_column": "p", "response_column": "r"}, "holds plain text"),
        ("tiny.txt", b"only one document\n", {}, "the validation split is empty"),
    ],
)
def test_bad_lm_sources_fail_clearly(tmp_path, name, content, data, message):
    src = tmp_path / name
    src.write_bytes(content)
    with pytest.raises(UserError, match=message):
        ingest.main(_lm_params(tmp_path, src, **data))
    assert not (tmp_path / "interim").exists()


def test_txt_is_refused_for_classification_with_the_task_named(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "train.txt").write_text("a\n")
    with pytest.raises(UserError, match=r"unsupported format '\.txt' for task classification"):
        ingest.main(_params(tmp_path, tmp_path / "src" / "train.txt"))
    with pytest.raises(UserError, match=r"no train\.csv/\.jsonl/\.parquet file"):
        ingest.main(_params(tmp_path, tmp_path / "src"))
