"""Stage validate: each check catches its own breakage, with the right name and count."""

from __future__ import annotations

import json
import os
import re
import socket

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GX_ANALYTICS_ENABLED"] = "False"

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from lmforge.common import UserError, run_main  # noqa: E402
from lmforge.data.summary import write_summary  # noqa: E402
from lmforge.params import parse_params  # noqa: E402
from stages.validate import main, run_suite  # noqa: E402
from tests.conftest import make_rows  # noqa: E402

LABELS = ["negative", "neutral", "positive"]
ANY = "<any example>"  # the example depends on the data; tests below pin it exactly


def clean_frames() -> dict[str, pd.DataFrame]:
    """36 train rows (12 per class) and 12 rows each for validation/test, no text shared."""
    frames = {"train": make_rows(12, seed=0)}
    for split in ("validation", "test"):
        df = make_rows(4, seed=1)
        frames[split] = df.assign(text=f"{split}: " + df["text"])
    return {s: df.astype({"text": "str", "label": "string"}) for s, df in frames.items()}


def params(**validate):
    labels = validate.pop("labels", None)
    return parse_params({"data": {"labels": labels}, "validate": validate})


def failed(report: dict) -> dict[str, dict]:
    return {name: c for name, c in report["checks"].items() if not c["success"]}


def test_clean_splits_pass_every_check():
    report = run_suite(clean_frames(), params())
    assert report["success"] and report["checks_failed"] == 0
    assert report["label_set"] == LABELS
    names = set(report["checks"])
    for split in ("train", "validation", "test"):
        for check in ("text_not_null", "text_not_blank", "text_length", "label_not_null",
                      "label_in_set", "duplicate_share", "label_column_exists"):
            assert f"{split}/{check}" in names
    assert {"train/min_rows_per_class", "train/majority_share"} <= names
    assert {"validation/no_leakage_from_train", "test/no_leakage_from_train"} <= names
    assert "train/no_leakage_from_train" not in names
    assert all(c["unexpected_count"] == 0 for c in report["checks"].values())


def _set(split, column, rows, value):
    def breaks(frames):
        frames[split].loc[rows, column] = value
    return breaks


def _leak(frames):
    frames["test"].loc[[0, 1], "text"] = frames["train"]["text"].iloc[[3, 4]].to_numpy()


def _thin_neutral(frames):
    train = frames["train"]
    drop = train.index[train["label"] == "neutral"][3:]
    frames["train"] = train.drop(drop)


def _tilt_to_positive(frames):
    train = frames["train"]
    frames["train"].loc[train.index[train["label"] == "neutral"][:2], "label"] = "positive"


def _repeat_three_texts(frames):
    frames["train"].loc[[0, 1, 2], "text"] = frames["train"]["text"].iloc[5]


# (why, breakage, validate params, failed check, unexpected count, an example shown; None: a null)
BREAKAGES = [
    ("null text", _set("validation", "text", [0, 1], None), {}, "validation/text_not_null", 2,
     None),
    ("blank text", _set("train", "text", [7], " \t "), {}, "train/text_not_blank", 1, " \t "),
    ("too long", _set("test", "text", [2], "x" * 81), {"max_text_chars": 80}, "test/text_length", 1,
     "x" * 81),
    ("too short", _set("train", "text", [2], "ab"), {"min_text_chars": 3}, "train/text_length", 1,
     "ab"),
    ("unknown label, given", _set("test", "label", [3], "spam"), {"labels": LABELS},
     "test/label_in_set", 1, "spam"),
    ("unknown label, derived", _set("validation", "label", [3, 4], "spam"), {},
     "validation/label_in_set", 2, "spam"),
    ("null label", _set("train", "label", [5], pd.NA), {}, "train/label_not_null", 1, None),
    ("thin class", _thin_neutral, {}, "train/min_rows_per_class", 1, "neutral: rows=3"),
    ("empty class", lambda f: None, {"labels": [*LABELS, "mixed"]}, "train/min_rows_per_class", 1,
     "mixed: rows=0"),
    ("majority", _tilt_to_positive, {"max_majority_share": 0.35}, "train/majority_share", 1,
     "positive: share=0.3889"),
    ("duplicates", _repeat_three_texts, {}, "train/duplicate_share", 3, ANY),
    ("leakage", _leak, {}, "test/no_leakage_from_train", 2, ANY),
]


@pytest.mark.parametrize(
    "breaks,validate,check,count,example",
    [b[1:] for b in BREAKAGES],
    ids=[b[0] for b in BREAKAGES],
)
def test_each_breakage_fails_its_check(breaks, validate, check, count, example):
    frames = clean_frames()
    breaks(frames)
    report = run_suite(frames, params(**validate))
    assert not report["success"]
    assert list(failed(report)) == [check]  # exactly this check, nothing collateral
    result = report["checks"][check]
    assert result["unexpected_count"] == count
    assert report["checks_failed"] == 1
    assert result["examples"]
    assert example is ANY or example in result["examples"]


def test_leaked_and_repeated_texts_are_the_examples():
    frames = clean_frames()
    _leak(frames)
    _repeat_three_texts(frames)
    report = run_suite(frames, params(examples=2))
    leaked = report["checks"]["test/no_leakage_from_train"]["examples"]
    assert leaked == frames["train"]["text"].iloc[[3, 4]].tolist()
    repeated = report["checks"]["train/duplicate_share"]["examples"]
    assert repeated == [frames["train"]["text"].iloc[5]] * 2  # capped at `examples`


def test_duplicates_under_the_share_pass_but_are_counted():
    frames = clean_frames()
    frames["train"].loc[0, "text"] = frames["train"]["text"].iloc[1]  # 1 of 36 rows: 2.8 % < 5 %
    check = run_suite(frames, params())["checks"]["train/duplicate_share"]
    assert check["success"] and check["unexpected_count"] == 1


def test_missing_label_column_fails_by_name_and_skips_its_checks():
    frames = clean_frames()
    frames["validation"] = frames["validation"].drop(columns="label")
    report = run_suite(frames, params())
    assert list(failed(report)) == ["validation/label_column_exists"]
    assert report["checks"]["validation/label_column_exists"]["unexpected_count"] == 1
    assert "validation/label_in_set" not in report["checks"]
    assert "validation/label_not_null" not in report["checks"]
    assert "test/label_in_set" in report["checks"]


def test_missing_train_text_column_drops_leakage_checks():
    frames = clean_frames()
    frames["train"] = frames["train"].rename(columns={"text": "review"})
    report = run_suite(frames, params())
    assert list(failed(report)) == ["train/text_column_exists"]
    assert not any(name.endswith("no_leakage_from_train") for name in report["checks"])


def test_a_null_bound_switches_its_check_off():
    frames = clean_frames()
    _repeat_three_texts(frames)
    _tilt_to_positive(frames)
    _leak(frames)
    off = dict(min_text_chars=None, max_text_chars=None, min_rows_per_class=None,
               max_majority_share=None, max_duplicate_share=None, check_leakage=False)
    report = run_suite(frames, params(**off))
    assert report["success"]
    for check in ("text_length", "duplicate_share", "no_leakage_from_train", "min_rows_per_class",
                  "majority_share"):
        assert not any(name.endswith(f"/{check}") for name in report["checks"]), check
    # Only one side of the length bound set: still checked.
    frames["train"].loc[0, "text"] = "x" * 90
    one_sided = run_suite(frames, params(**{**off, "max_text_chars": 80}))
    assert list(failed(one_sided)) == ["train/text_length"]


@pytest.fixture
def interim(tmp_path, monkeypatch):
    """Write splits where params.yaml's default paths expect them; no socket may connect."""
    monkeypatch.chdir(tmp_path)
    attempts = []

    def refuse(sock, address):
        attempts.append(address)
        raise OSError("tests are offline")

    monkeypatch.setattr(socket.socket, "connect", refuse)

    def write(frames):
        (tmp_path / "data/interim").mkdir(parents=True, exist_ok=True)
        for split, df in frames.items():
            df.to_parquet(tmp_path / f"data/interim/{split}.parquet", index=False)

    yield write
    assert attempts == [], f"something tried to reach the network: {attempts}"


def test_main_writes_metrics_and_docs_then_fails_with_a_summary(interim, tmp_path, capsys):
    frames = clean_frames()
    _leak(frames)
    interim(frames)
    stale = tmp_path / "reports/validation/old-run/stale.html"  # GX prunes only its own pages
    stale.parent.mkdir(parents=True)
    stale.write_text("from an earlier run")
    with pytest.raises(SystemExit) as exit_:
        run_main(lambda: main(params()))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: validation failed: 1 of")
    assert "test/no_leakage_from_train: 2 unexpected" in err
    assert repr(frames["train"]["text"].iloc[3]) in err
    assert "full report: reports/validation/summary.html" in err  # the page readable offline
    metrics = json.loads((tmp_path / "metrics/validation.json").read_text())
    assert metrics["success"] is False and metrics["checks_failed"] == 1
    assert metrics["checks"]["test/no_leakage_from_train"] == 2
    assert metrics["checks"]["train/text_not_null"] == 0
    assert (tmp_path / "reports/validation/index.html").exists()
    page = (tmp_path / "reports/validation/summary.html").read_text()
    assert "Validation FAILED: 1 of" in page and "<script" not in page and "<link" not in page
    assert not stale.exists()
    assert list((tmp_path / "reports/validation/validations").rglob("*.html"))


def test_summary_page_marks_each_check_and_names_the_class(tmp_path):
    """reports/validation/summary.html: every check by its terminal name, failed ones first and
    marked, the class of a class-balance failure, the bounds, examples escaped."""
    frames = clean_frames()
    _thin_neutral(frames)
    frames["train"].loc[frames["train"].index[3], "text"] = "<b>bold</b> & sturdy"
    _leak(frames)
    report = run_suite(frames, params())
    html = write_summary(report, tmp_path).read_text()

    rows = re.findall(r'<tr class="(passed|failed)"><td><code>([^<]+)</code>', html)
    assert {name for _, name in rows} == set(report["checks"])
    assert rows[:2] == [("failed", "test/no_leakage_from_train"), ("failed", "train/min_rows_per_class")]
    assert all(verdict == "passed" for verdict, _ in rows[2:])
    assert html.count('<span class="verdict">FAILED</span>') == 2
    assert "Validation FAILED: 2 of" in html and "Labels: negative, neutral, positive." in html
    assert "&#x27;neutral: rows=3&#x27;" in html and "min_value=5" in html  # the class, the floor
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; sturdy" in html and "<b>bold" not in html
    assert not re.search(r"<(script|link|img)\b", html)  # nothing to load: reads the same offline


def test_main_passes_on_clean_splits(interim, tmp_path, capsys):
    interim(clean_frames())
    report = main(params())
    assert report["success"]
    assert capsys.readouterr().out.startswith("validate: all ")
    metrics = json.loads((tmp_path / "metrics/validation.json").read_text())
    assert metrics["success"] is True and metrics["checks_failed"] == 0
    assert (tmp_path / "reports/validation/index.html").exists()


def test_main_names_a_missing_split_and_the_stage_to_run(interim):
    frames = clean_frames()
    del frames["test"]
    interim(frames)
    with pytest.raises(UserError, match=r"data/interim/test\.parquet.*dvc repro ingest"):
        main(params())


# --- task causal_lm ------------------------------------------------------------------------------

def lm_params(pairs: bool = False, **validate):
    data = {"prompt_column": "prompt", "response_column": "response"} if pairs else {}
    return parse_params({
        "task": "causal_lm", "data": data, "validate": validate, "model": {"source": "scratch"},
        "train": {"early_stopping": {"monitor": "val_loss", "mode": "min"}},
        "gate": {"floors": {}, "tolerances": {}},
    })


def lm_frames(pairs: bool = False) -> dict[str, pd.DataFrame]:
    """Distinct texts (plain: multi-line documents) or prompt/response pairs per split, no overlap."""
    frames = {}
    for split, n in (("train", 30), ("validation", 8), ("test", 8)):
        if pairs:
            prompts = [f"{split} prompt {i}" for i in range(n)]
            frames[split] = pd.DataFrame({"prompt": prompts, "response": [p.upper() for p in prompts]})
        else:
            frames[split] = pd.DataFrame({"text": [f"{split} doc {i}\nsecond line" for i in range(n)]})
    return frames


def test_lm_plain_text_checks_have_no_label_checks():
    report = run_suite(lm_frames(), lm_params())
    assert report["success"] and report["label_set"] is None
    assert set(report["checks"]) == {
        *(f"{s}/{c}" for s in ("train", "validation", "test") for c in
          ("text_column_exists", "text_not_null", "text_not_blank", "text_length",
           "duplicate_share")),
        "validation/no_leakage_from_train", "test/no_leakage_from_train"}


def test_lm_pair_checks_cover_prompt_and_response():
    report = run_suite(lm_frames(pairs=True), lm_params(pairs=True))
    assert report["success"]
    for check in ("prompt_column_exists", "response_column_exists", "prompt_not_null",
                  "response_not_null", "prompt_not_blank", "response_not_blank", "prompt_length",
                  "response_length", "duplicate_share"):
        assert f"validation/{check}" in report["checks"], check
    assert not any("label" in name or name.endswith("/text_not_null") for name in report["checks"])


def _lm_leak_prompt(frames):  # the responses differ: a seen prompt alone is the leak
    frames["test"].loc[[1, 2], "prompt"] = frames["train"]["prompt"].iloc[[0, 5]].to_numpy()


def _lm_repeat_pairs(frames):
    frames["train"].loc[[1, 2, 3], ["prompt", "response"]] = frames["train"].iloc[0][
        ["prompt", "response"]].to_numpy()


def _lm_same_prompt_new_response(frames):
    frames["train"].loc[[1, 2, 3], "prompt"] = frames["train"]["prompt"].iloc[0]


LM_BREAKAGES = [  # (why, breakage, validate params, failed checks {name: count}, an example)
    ("missing response", _set("validation", "response", [2], None), {},
     {"validation/response_not_null": 1}, None),
    ("blank response", _set("test", "response", [0, 1], "  "), {},
     {"test/response_not_blank": 2}, "  "),
    ("long prompt", _set("train", "prompt", [4], "p" * 50), {"max_text_chars": 40},
     {"train/prompt_length": 1}, "p" * 50),
    ("leaked test prompt", _lm_leak_prompt, {}, {"test/no_leakage_from_train": 2}, "train prompt 0"),
    ("repeated pairs", _lm_repeat_pairs, {}, {"train/duplicate_share": 3}, "train prompt 0"),
]


@pytest.mark.parametrize("breaks,validate,checks,example", [b[1:] for b in LM_BREAKAGES],
                         ids=[b[0] for b in LM_BREAKAGES])
def test_each_lm_pair_breakage_fails_its_check(breaks, validate, checks, example):
    frames = lm_frames(pairs=True)
    breaks(frames)
    report = run_suite(frames, lm_params(pairs=True, **validate))
    assert {name: c["unexpected_count"] for name, c in failed(report).items()} == checks
    assert example in report["checks"][next(iter(checks))]["examples"]


def test_a_repeated_prompt_with_another_response_is_not_a_duplicate_pair():
    frames = lm_frames(pairs=True)
    _lm_same_prompt_new_response(frames)
    assert run_suite(frames, lm_params(pairs=True))["success"]


def test_lm_plain_leakage_and_missing_column():
    frames = lm_frames()
    frames["test"].loc[0, "text"] = frames["train"]["text"].iloc[3]
    frames["validation"] = frames["validation"].rename(columns={"text": "body"})
    report = run_suite(frames, lm_params())
    assert set(failed(report)) == {"test/no_leakage_from_train", "validation/text_column_exists"}
    assert report["checks"]["test/no_leakage_from_train"]["examples"] == ["train doc 3\nsecond line"]


def test_lm_main_fails_with_a_summary_naming_the_leaked_prompt(interim, capsys):
    frames = lm_frames(pairs=True)
    _lm_leak_prompt(frames)
    frames["validation"].loc[2, "response"] = None
    interim(frames)
    with pytest.raises(SystemExit):
        run_main(lambda: main(lm_params(pairs=True)))
    err = capsys.readouterr().err
    assert err.startswith("error: validation failed: 2 of")
    assert "test/no_leakage_from_train: 2 unexpected [expect_column_values_to_be_null(" \
           "prompt_also_in_train)]" in err
    assert "'train prompt 0'" in err and "validation/response_not_null: 1 unexpected" in err
