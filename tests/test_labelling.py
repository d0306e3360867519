"""The labelling loop in ingest: rows without a label are kept aside (never a split), Label Studio
exports add labels (majority, ties and skips counted, agreement in the manifest), mixed sources
work, and the rows kept aside never reach what train and evaluate read.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from lmforge.common import UserError
from lmforge.params import parse_params
from stages import ingest
from tests.conftest import LABELS, make_rows


def ann(label: str | None) -> dict:
    """A submitted annotation choosing ``label``; None: a skipped one."""
    if label is None:
        return {"was_cancelled": True, "result": []}
    return {"was_cancelled": False, "result": [{"from_name": "label", "to_name": "text",
                                                 "type": "choices", "value": {"choices": [label]}}]}


def ls_task(text: str, *labels: str | None) -> dict:
    return {"data": {"text": text}, "annotations": [ann(lab) for lab in labels]}


def params_for(tmp_path, source, **data):
    names = {"raw": "raw", "interim": "interim", "manifest": "data.json", "processed": "processed",
             "validation": "validation.json", "data_docs": "docs"}
    return parse_params({"data": {"source": str(source), **data},
                         "paths": {k: str(tmp_path / v) for k, v in names.items()}})


def interim(params, name: str) -> pd.DataFrame:
    return pd.read_parquet(params.paths.interim / f"{name}.parquet")


def split_texts(params) -> set[str]:
    return {t for s in ("train", "validation", "test") for t in interim(params, s)["text"]}


@pytest.fixture
def rows() -> pd.DataFrame:
    return make_rows(n_per_class=12, seed=1)


def test_empty_label_cells_are_kept_aside_and_counted(tmp_path, rows):
    src = tmp_path / "reviews.csv"
    unlabeled = ["  a  kettle i have not judged  ", "a lamp nobody rated", "a lamp nobody rated"]
    extra = pd.DataFrame({"text": [*unlabeled, "blank label", rows.text[0]],
                          "label": [None] * 3 + ["  ", None]})
    pd.concat([rows, extra]).to_csv(src, index=False)
    params = params_for(tmp_path, src)
    manifest = ingest.main(params)
    assert manifest["rows"]["total"] == len(rows)  # every labelled row, none of the others
    assert split_texts(params) == set(rows.text)
    pool = interim(params, "unlabeled")
    assert list(pool.columns) == ["text"]
    assert sorted(pool.text) == ["a kettle i have not judged", "a lamp nobody rated", "blank label"]
    # rows.text[0] has a label elsewhere in the source: it is no row to label.
    assert manifest["unlabeled"] == {"rows": 3, "dropped": {"empty": 0, "duplicate": 1,
                                                            "labelled": 1, "in_label_studio": 0}}


def test_a_source_without_rows_to_label_keeps_its_manifest_and_an_empty_pool(tmp_path, rows):
    rows.to_csv(tmp_path / "r.csv", index=False)
    params = params_for(tmp_path, tmp_path / "r.csv")
    manifest = ingest.main(params)
    assert not {"unlabeled", "label_studio"} & set(manifest)  # the sample's metrics stay as they were
    assert len(interim(params, "unlabeled")) == 0


def test_a_folder_source_may_hold_an_unlabeled_file(tmp_path, rows):
    folder = tmp_path / "src"
    folder.mkdir()
    rows.to_csv(folder / "train.csv", index=False)
    pd.DataFrame({"text": ["to label one", "to label two"]}).to_json(
        folder / "unlabeled.jsonl", orient="records", lines=True)
    params = params_for(tmp_path, folder)
    manifest = ingest.main(params)
    assert sorted(interim(params, "unlabeled").text) == ["to label one", "to label two"]
    assert manifest["rows"]["total"] == len(rows) and manifest["unlabeled"]["rows"] == 2
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["train.csv", "unlabeled.jsonl"]


@pytest.mark.parametrize("table, message", [
    ({"review": ["x"]}, r"unlabeled.csv: missing column 'text' \(data.text_column\)"),
    ({"text": ["x", "y"], "label": ["positive", None]},
     r"unlabeled.csv: 1 row\(s\) have a label: rows with labels belong in train"),
])
def test_a_bad_unlabeled_file_is_named(tmp_path, rows, table, message):
    folder = tmp_path / "src"
    folder.mkdir()
    rows.to_csv(folder / "train.csv", index=False)
    pd.DataFrame(table).to_csv(folder / "unlabeled.csv", index=False)
    with pytest.raises(UserError, match=message):
        ingest.main(params_for(tmp_path, folder))


def test_a_split_without_any_label_is_refused(tmp_path, rows):
    folder = tmp_path / "src"
    folder.mkdir()
    rows.to_csv(folder / "train.csv", index=False)
    pd.DataFrame({"text": ["a", "b"], "label": [None, None]}).to_csv(folder / "test.csv", index=False)
    with pytest.raises(UserError, match=r"test.csv: no row has a label \(2 without one\)"):
        ingest.main(params_for(tmp_path, folder))


def test_exports_fill_replace_and_add_labels_and_the_manifest_counts_them(tmp_path, rows):
    folder = tmp_path / "src"
    (folder / "labelstudio").mkdir(parents=True)
    source = rows.copy()
    source.loc[0, "label"] = None  # labelled in Label Studio: filled
    wrong = "negative" if source.loc[1, "label"] != "negative" else "positive"
    right, source.loc[1, "label"] = source.loc[1, "label"], wrong  # fixed in Label Studio
    source.to_csv(folder / "train.csv", index=False)
    pd.DataFrame({"text": ["queued one", "new   one", "tied one", "fresh"]}).to_csv(
        folder / "unlabeled.csv", index=False)
    tasks = [
        ls_task(rows.text[0], "neutral", "neutral", None),
        ls_task(rows.text[1], right, right, wrong),
        ls_task("new one", "positive"),  # labelled: leaves the pool, joins train
        ls_task("tied one", "positive", "negative"),  # a tie: no label, not a row to select again
        ls_task("queued one"),  # in Label Studio, not yet labelled
    ]
    (folder / "labelstudio" / "project-1-at-2024-06-07.json").write_text(json.dumps(tasks))
    params = params_for(tmp_path, folder)
    manifest = ingest.main(params)

    labelled = pd.concat([interim(params, s) for s in ("train", "validation", "test")])
    label_of = dict(zip(labelled.text, labelled.label, strict=True))
    assert label_of[rows.text[0]] == "neutral" and label_of[rows.text[1]] == right
    assert label_of["new one"] == "positive" and "tied one" not in label_of
    assert list(interim(params, "unlabeled").text) == ["fresh"]
    studio = manifest["label_studio"]
    assert {k: v for k, v in studio.items() if k != "agreement"} == {
        "files": 1, "tasks": 5, "annotations": 8, "skipped": 1, "unannotated": 1, "ties": 1,
        "labelled": 3, "new_rows": 1, "filled": 1, "relabelled": 1}
    # pairs: rows.text[0] 2 of 2, rows.text[1] 2 of 6, tied one 0 of 2 -> 4 / 10
    assert studio["agreement"]["tasks"] == 3 and studio["agreement"]["overall"] == pytest.approx(0.4)
    assert studio["agreement"]["per_class"]["neutral"] == 1.0
    assert manifest["unlabeled"]["dropped"] == {"empty": 0, "duplicate": 0, "labelled": 1,
                                                "in_label_studio": 2}
    assert (tmp_path / "raw" / "labelstudio" / "project-1-at-2024-06-07.json").is_file()


def test_a_later_export_replaces_an_earlier_task(tmp_path, rows):
    folder = tmp_path / "src"
    (folder / "labelstudio").mkdir(parents=True)
    rows.to_csv(folder / "train.csv", index=False)
    for name, label in (("project-1-at-2024-06-07.json", "negative"),
                        ("project-1-at-2024-06-09.json", "positive")):
        (folder / "labelstudio" / name).write_text(json.dumps([ls_task("changed my mind", label)]))
    params = params_for(tmp_path, folder)
    ingest.main(params)
    train = interim(params, "train")
    assert train.loc[train.text == "changed my mind", "label"].tolist() == ["positive"]


def test_a_single_export_is_a_source(tmp_path):
    rows = make_rows(n_per_class=8, seed=2)
    src = tmp_path / "project-2.json"
    src.write_text(json.dumps([ls_task(t, lab, lab) for t, lab in zip(rows.text, rows.label, strict=True)]))
    params = params_for(tmp_path, src)
    manifest = ingest.main(params)
    assert manifest["rows"]["total"] == 24 and manifest["label_studio"]["new_rows"] == 24
    assert manifest["label_studio"]["agreement"]["overall"] == 1.0
    assert (tmp_path / "raw" / "project-2.json").read_bytes() == src.read_bytes()


def test_an_exported_choice_outside_the_label_set_is_named(tmp_path, rows):
    folder = tmp_path / "src"
    (folder / "labelstudio").mkdir(parents=True)
    rows.to_csv(folder / "train.csv", index=False)
    (folder / "labelstudio" / "e.json").write_text(json.dumps([ls_task("x", "mixed")]))
    with pytest.raises(UserError, match=r"e.json: task 0, annotation 0: choice 'mixed' is not a "
                                        r"label: the label set is \['negative', 'neutral', 'positive'\]"):
        ingest.main(params_for(tmp_path, folder))
    # data.labels decides when set: a new class is welcome once it is named there.
    params = params_for(tmp_path, folder, labels=[*LABELS, "mixed"])
    assert ingest.main(params)["label_studio"]["new_rows"] == 1


def test_rows_without_labels_never_reach_what_train_and_evaluate_read(tmp_path, rows, tiny_model_dir):
    """Train and evaluate read only prepare's datasets: the pool's texts must be in none of them,
    and validate must pass with the pool beside the splits."""
    from datasets import load_from_disk

    from stages import prepare, validate

    src = tmp_path / "reviews.csv"
    pool = [f"the kettle is {w} 9{i}" for i, w in enumerate(("okay", "awful", "great", "fine"))]
    pd.concat([rows, pd.DataFrame({"text": pool, "label": [None] * 4})]).to_csv(src, index=False)
    params = params_for(tmp_path, src, labels=LABELS)
    params = params.model_copy(update={
        "model": params.model.model_copy(update={"source": str(tiny_model_dir)}),
        "prepare": params.prepare.model_copy(update={"max_length": 32})})
    ingest.main(params)
    assert validate.main(params)["success"]
    prepare.main(params)
    datasets = load_from_disk(str(params.paths.processed / "datasets"))
    seen = {t for split in datasets.values() for t in split["text"]}
    assert seen == set(rows.text) and not seen & set(pool)
    assert sorted(interim(params, "unlabeled").text) == sorted(pool)


@pytest.mark.slow
def test_dvc_repro_audits_before_prepare_and_selects_after_train(tmp_path, tiny_model_dir):
    """The loop's stages in the DAG: audit between validate and prepare (its bound stops the
    pipeline there), select after train, and the pool nowhere but in select's tasks."""
    from datasets import load_from_disk

    from tests.helpers import dvc, set_params, tiny_repo

    repo = tiny_repo(tmp_path / "repo", tiny_model_dir)
    pool = ["the mouse is okay and awful 97", "the lamp is great and slow 98"]
    rows = pd.read_csv(repo / "data/tiny.csv")
    flips = {"negative": "positive", "positive": "neutral", "neutral": "negative"}
    rows.loc[:2, "label"] = rows.loc[:2, "label"].map(flips)  # some noise for the audit to find
    pd.concat([rows, pd.DataFrame({"text": pool, "label": [None, None]})]).to_csv(
        repo / "data/tiny.csv", index=False)
    run = dvc(repo, "repro", "select")
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((repo / "metrics/audit.json").read_text())["rows"] == len(rows)
    assert (repo / "reports/audit/label_issues.csv").is_file()
    datasets = load_from_disk(str(repo / "data/processed/datasets"))
    seen = {t for split in datasets.values() for t in split["text"]}
    assert seen == set(rows.text)
    ranking = pd.read_csv(repo / "reports/select/ranking.csv")
    assert sorted(ranking["text"]) == sorted(pool)  # the tiny BERT's embeddings are all alike:
    tasks = json.loads((repo / "reports/select/tasks.json").read_text())  # the guard may keep one
    assert tasks and {t["data"]["text"] for t in tasks} <= set(pool)

    set_params(repo, audit={"max_noise_rate": 0.0})
    before = (repo / "data/processed/stats.json").stat().st_mtime_ns
    run = dvc(repo, "repro", "prepare")
    assert run.returncode != 0 and "audit.max_noise_rate (0.0)" in run.stderr
    assert (repo / "data/processed/stats.json").stat().st_mtime_ns == before  # prepare never ran


def test_a_folder_of_exports_and_rows_to_label_needs_no_train_file(tmp_path):
    rows = make_rows(n_per_class=8, seed=6)
    folder = tmp_path / "src"
    (folder / "labelstudio").mkdir(parents=True)
    pd.DataFrame({"text": [*rows.text[:3], "still to label"]}).to_csv(folder / "unlabeled.csv",
                                                                     index=False)
    (folder / "labelstudio" / "e.json").write_text(json.dumps(
        [ls_task(t, lab) for t, lab in zip(rows.text, rows.label, strict=True)]))
    params = params_for(tmp_path, folder)
    manifest = ingest.main(params)
    assert manifest["rows"]["total"] == 24 and split_texts(params) == set(rows.text)
    assert list(interim(params, "unlabeled").text) == ["still to label"]
