"""The bad-input catalog of the data path: each bad input stops the pipeline with a message naming it.

The source-level cases run `dvc repro prepare` in a copy of one tiny baseline repo and check that
nothing after the failing stage ran and that the last good outputs are still there, byte for byte.
The cases that pass ingest and fail validate run the two stages directly on files in tmp_path.
The README's "Bad inputs" table lists every case and the message's first line.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from functools import partial
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lmforge.common import run_main, sha256_of
from lmforge.params import parse_params
from stages import ingest, validate
from tests.conftest import make_rows, tmp_paths
from tests.helpers import copy_repo, dvc, set_params

SOURCE = "data/tiny.csv"
# What a failed run must leave as it was: every output of ingest, validate and prepare.
OUTPUTS = ("data/raw", "data/interim", "data/processed", "metrics/data.json",
           "metrics/validation.json", "reports/validation")


def snapshot(repo: Path) -> dict[str, str]:
    """SHA-256 of every file under OUTPUTS, by path relative to the repo."""
    files = [p for out in OUTPUTS for p in sorted((repo / out).rglob("*")) + [repo / out]]
    return {str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files if p.is_file()}


def lock(repo: Path) -> dict:
    """dvc.lock's stages but check, which records each params.yaml it found valid (a new
    data.source passes it: the file is there, and ingest is what refuses its content)."""
    stages = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {name: stage for name, stage in stages.items() if name != "check"}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_model_dir) -> Path:
    """A repo copy that ran `dvc repro prepare` on 36 tiny rows: the last good state."""
    repo = copy_repo(tmp_path_factory.mktemp("baseline") / "repo")
    make_rows(n_per_class=12, seed=3).to_csv(repo / SOURCE, index=False)
    set_params(repo, model={"source": str(tiny_model_dir)}, prepare={"max_length": 32},
               data={"source": SOURCE, "split": {"validation": 0.25, "test": 0.25}})
    run = dvc(repo, "repro", "prepare")
    assert run.returncode == 0, run.stderr[-3000:]
    return repo


@pytest.fixture
def repo(baseline, tmp_path) -> Path:
    return Path(shutil.copytree(baseline, tmp_path / "repo", symlinks=True))


def _write(content: bytes, name: str = SOURCE):
    def breaks(repo: Path) -> None:
        (repo / name).write_bytes(content)
        if name != SOURCE:
            set_params(repo, data={"source": name})
    return breaks


# (case, how the source is broken, what the message's first line must say)
SOURCE_CASES = [
    ("missing file", lambda repo: (repo / SOURCE).unlink(),
     f"No such file or directory: '{{repo}}/{SOURCE}'"),
    ("empty file", _write(b""), f"error: {SOURCE}: the file is empty"),
    ("unsupported format", _write(b"text\tlabel\nnice\tpositive\n", "data/tiny.tsv"),
     "error: data/tiny.tsv: unsupported format '.tsv' (use .csv, .jsonl, .json, .parquet)"),
    ("missing column", _write(b"review,label\nnice one,positive\n"),
     f"error: {SOURCE}: missing column(s) ['text'] (data.text_column); "
     "the file has columns ['review', 'label']"),
    ("non-UTF-8 bytes", _write("text,label\nnice,positive\ncaf\xe9 au lait,neutral\n".encode("cp1252")),
     f"error: {SOURCE}: not UTF-8 text (byte 0xe9 on line 3: 'caf\ufffd au lait,neutral')"),
    ("wrong delimiter", _write(b"text;label\nnice one;positive\n"),
     "the header looks semicolon-separated ('text;label')"),
]


@pytest.mark.slow
@pytest.mark.parametrize("breaks,says", [c[1:] for c in SOURCE_CASES], ids=[c[0] for c in SOURCE_CASES])
def test_bad_source_stops_dvc_repro_and_keeps_the_last_good_outputs(repo, breaks, says):
    before, lock_before = snapshot(repo), lock(repo)
    breaks(repo)
    run = dvc(repo, "repro", "prepare")
    assert run.returncode != 0
    # The first error line, ours ("error: ...") or DVC's ("ERROR: ..."): DVC may warn before it.
    first = next(line for line in run.stderr.splitlines() if line.lower().startswith("error"))
    assert says.format(repo=repo) in first, run.stderr
    assert "Traceback" not in run.stderr + run.stdout
    assert "Running stage 'validate'" not in run.stdout  # nothing after ingest ran
    assert lock(repo) == lock_before
    assert snapshot(repo) == before  # raw, interim, processed, metrics: all as they were
    assert not list((repo / "data").glob(".*.tmp")) and not list((repo / "data").glob(".*.old"))


@pytest.mark.slow
def test_after_a_failed_ingest_restoring_the_source_needs_no_rerun(repo):
    good = (repo / SOURCE).read_bytes()
    (repo / SOURCE).write_bytes(b"")
    assert dvc(repo, "repro", "prepare").returncode != 0
    status = dvc(repo, "status", "ingest").stdout
    assert "modified:           data/tiny.csv" in status and "changed outs" not in status
    (repo / SOURCE).write_bytes(good)
    run = dvc(repo, "repro", "prepare")
    assert run.returncode == 0 and "Running stage" not in run.stdout, run.stdout


@pytest.mark.slow
def test_changed_source_content_changes_the_hash_and_reruns_the_data_stages(repo):
    before = json.loads((repo / "metrics/data.json").read_text())
    interim = sha256_of(repo / "data/interim/train.parquet")
    make_rows(n_per_class=12, seed=4).to_csv(repo / SOURCE, index=False)
    status = dvc(repo, "status", "--with-deps", "prepare").stdout
    assert "ingest:" in status and "modified:           data/tiny.csv" in status
    run = dvc(repo, "repro", "prepare")
    assert run.returncode == 0, run.stderr[-3000:]
    for stage in ("ingest", "validate", "prepare"):
        assert f"Running stage '{stage}'" in run.stdout
    after = json.loads((repo / "metrics/data.json").read_text())
    assert after["source_sha256"] != before["source_sha256"]
    assert after["source_sha256"] == sha256_of(repo / "data/raw")
    assert sha256_of(repo / "data/interim/train.parquet") != interim  # persisted, yet replaced
    assert (repo / "data/raw/tiny.csv").read_bytes() == (repo / SOURCE).read_bytes()
    assert "up to date" in dvc(repo, "status", "--with-deps", "prepare").stdout


# Stage-level cases: the source is read, so ingest or validate names the problem.


@pytest.fixture
def stages(tmp_path, capsys):
    """Write the source under tmp_path, run ingest then validate; return the first error's text."""

    def run(frames: dict[str, pd.DataFrame] | pd.DataFrame | bytes, name="data.csv", **data) -> str:
        src = tmp_path / "src"
        src.mkdir(exist_ok=True)
        if isinstance(frames, bytes):
            (src / name).write_bytes(frames)
            source = src / name
        elif isinstance(frames, pd.DataFrame):
            frames.to_csv(src / "data.csv", index=False)
            source = src / "data.csv"
        else:
            for split, df in frames.items():
                df.to_csv(src / f"{split}.csv", index=False)
            source = src
        params = parse_params({"paths": tmp_paths(tmp_path), "data": {
            "source": str(source), "split": {"validation": 0.25, "test": 0.25}, **data}})
        for stage in (ingest, validate):
            with pytest.raises(SystemExit) as exit_:
                run_main(partial(stage.main, params))
                raise SystemExit(0)
            if exit_.value.code:
                assert exit_.value.code == 2
                err = capsys.readouterr().err
                assert err.startswith("error: ") and "Traceback" not in err
                return err.removeprefix("error: ").replace(str(tmp_path) + "/", "")
        raise AssertionError("both stages passed")

    return run


def _with(df: pd.DataFrame, text: list, label: list) -> pd.DataFrame:
    return pd.concat([df, pd.DataFrame({"text": text, "label": label})], ignore_index=True)


ROWS = make_rows(12, seed=0)


def test_empty_split_after_cleaning_names_the_split_and_the_dropped_counts(stages):
    test = pd.DataFrame({"text": ["  ", None, "\t", "\u3000"], "label": ["neutral"] * 4})
    err = stages({"train": ROWS, "test": test})
    assert err.startswith("src/test.csv (test split): 0 rows left after cleaning "
                          "(4 read: 4 empty, 0 duplicate dropped; data.clean), e.g. {'text': '  ',")


def test_carved_split_that_rounds_to_nothing_is_named(stages):
    err = stages(make_rows(1, seed=0))
    assert err.startswith("src/data.csv: the validation split is empty: data.split.validation = "
                          "0.25 of each class rounds to 0 rows")
    assert "'negative': 1" in err


def test_header_only_file(stages):
    assert stages(b"text,label\n").startswith(
        "src/data.csv: the file holds no rows (columns: ['text', 'label'])")


def test_unparseable_jsonl_line_is_named(stages):
    err = stages(b'{"text": "nice", "label": "positive"}\nnot json\n', name="data.jsonl")
    assert err.startswith("src/data.jsonl: cannot be read as jsonl: ")
    assert "(line 2: 'not json')" in err


def test_semicolon_file_with_commas_in_texts_still_gets_the_delimiter_hint(stages):
    err = stages(b"text;label\nbad;negative\nnice, really;positive\n")
    assert err.startswith("src/data.csv: cannot be read as csv: Error tokenizing data. C error: "
                          "Expected 1 fields in line 3, saw 2")
    assert "the header looks semicolon-separated" in err


@pytest.mark.parametrize("fmt,example", [("csv", "['1', 'positive']"), ("jsonl", "[1, 'positive']")])
def test_numeric_and_string_labels_mixed(stages, fmt, example):
    df = ROWS.assign(label=pd.Series([[1, "positive"][i % 2] for i in range(len(ROWS))], dtype=object))
    content = df.to_csv(index=False) if fmt == "csv" else df.to_json(orient="records", lines=True)
    err = stages(content.encode(), name=f"data.{fmt}")
    assert err.startswith(f"src/data.{fmt} column 'label': label column mixes numbers and strings "
                          f"(18 numeric, 18 text, e.g. {example}); use one kind"), err


def test_null_and_blank_texts_are_dropped_and_counted(tmp_path):
    src = tmp_path / "d.csv"
    _with(ROWS, [None, "   ", "\u3000"], ["neutral"] * 3).to_csv(src, index=False)
    params = parse_params({"paths": tmp_paths(tmp_path), "data": {"source": str(src)}})
    manifest = ingest.main(params)
    assert manifest["dropped"]["source"] == {"empty": 3, "duplicate": 0}
    assert manifest["rows"]["total"] == len(ROWS)


# (case, rows, data params, validate params, failed checks, text in the message)
VALIDATE_CASES = [
    ("null and blank texts kept", _with(ROWS, [None, "   "], ["neutral"] * 2),
     {"clean": {"drop_empty": False}}, {}, ["train/text_not_null", "train/text_not_blank"], "e.g. None"),
    ("label outside the label set", _with(ROWS, ["odd one"] * 1, ["bogus"]),
     {"labels": ["negative", "neutral", "positive"]}, {}, ["train/label_in_set"], "'bogus'"),
    ("class with too few rows", _with(ROWS, ["meh 1", "meh 2"], ["mixed"] * 2),
     {}, {}, ["train/min_rows_per_class"], "mixed: rows=2"),
    ("duplicates above the bound", _with(ROWS, [ROWS["text"][0]] * 4, [ROWS["label"][0]] * 4),
     {"clean": {"drop_duplicates": False}}, {}, ["train/duplicate_share"], repr(ROWS["text"][0])),
    ("extremely long text", _with(ROWS, ["x" * 100_000], ["neutral"]),
     {}, {}, ["train/text_length"], "xxx... (100000 chars)"),
]


@pytest.mark.parametrize("df,data,checks,says", [(c[1], c[2], c[4], c[5]) for c in VALIDATE_CASES],
                         ids=[c[0] for c in VALIDATE_CASES])
def test_validate_names_the_check_count_and_an_example(stages, df, data, checks, says):
    err = stages({"train": df, "validation": make_rows(4, seed=5), "test": make_rows(4, seed=6)},
                 **data)
    assert err.startswith("validation failed: ")
    failed = [line.split(":")[0].strip() for line in err.splitlines() if " unexpected [" in line]
    assert set(checks) <= set(failed), err
    assert err.count(says) == 1, err  # the example, once: repeated texts are shown once
    assert len(err) < 2000  # a 100k-char text is shown cut short


def test_train_test_overlap_is_leakage(stages):
    test = pd.concat([ROWS.iloc[:2], make_rows(4, seed=6)], ignore_index=True)
    err = stages({"train": ROWS, "validation": make_rows(4, seed=5), "test": test})
    assert "test/no_leakage_from_train: 2 unexpected" in err
    assert repr(ROWS["text"][0]) in err


def test_a_run_killed_mid_write_leaves_nothing_that_the_next_run_keeps(tmp_path):
    src = tmp_path / "d.csv"
    ROWS.to_csv(src, index=False)
    params = parse_params({"paths": tmp_paths(tmp_path), "data": {"source": str(src)}})
    interim = params.paths.interim
    ingest.main(params)
    good = sha256_of(interim / "train.parquet")
    # What a kill between the two renames of replace_dir leaves: a half-written folder and the old one.
    (interim.parent / ".interim.new").mkdir()
    (interim.parent / ".interim.new" / "train.parquet").write_bytes(b"half")
    interim.rename(interim.parent / ".interim.old")
    ingest.main(params)
    assert sha256_of(interim / "train.parquet") == good
    assert sorted(p.name for p in interim.parent.iterdir()) == ["interim", "raw"]
