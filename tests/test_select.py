"""Stage select: uncertainty ranking, the diversity guard, and the Label Studio tasks it writes."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from lmforge.classification.select import RANKING, choose, uncertainty
from lmforge.data.labelstudio import row_id
from lmforge.params import parse_params
from stages import select
from tests.conftest import LABELS, write_trained_model


def test_margin_and_entropy_rank_the_unsure_first():
    probs = np.array([[0.98, 0.01, 0.01], [0.4, 0.35, 0.25], [1 / 3] * 3, [0.5, 0.5, 0.0]])
    margin = uncertainty(probs, "margin")
    assert margin == pytest.approx([0.03, 0.95, 1.0, 1.0])
    entropy = uncertainty(probs, "entropy")
    assert entropy[2] == pytest.approx(1.0) and entropy[0] < 0.15
    assert entropy[3] == pytest.approx(np.log(2) / np.log(3))  # two-way tie: less than all-way
    assert np.argsort(-entropy, kind="stable").tolist() == [2, 1, 3, 0]


def test_the_diversity_guard_skips_near_duplicates_of_chosen_rows():
    vectors = np.array([[1.0, 0.0], [0.99, 0.141], [0.0, 1.0], [0.6, 0.8]])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    order = np.array([0, 1, 2, 3])
    chosen, near = choose(order, vectors, top_n=3, max_similarity=0.95)
    assert chosen == [0, 2, 3] and near.tolist() == [-1, 0, -1, -1]  # row 1 is row 0 again
    chosen, _ = choose(order, vectors, top_n=2, max_similarity=None)
    assert chosen == [0, 1]  # guard off: the two least sure, however alike


@pytest.fixture
def selecting(tmp_path, tiny_model_dir):
    names = {"interim": "interim", "model": "model", "select": "reports/select"}
    params = parse_params({"paths": {k: str(tmp_path / v) for k, v in names.items()},
                           "model": {"source": str(tiny_model_dir)}, "prepare": {"max_length": 32},
                           "select": {"top_n": 4, "max_similarity": 0.99}})
    params.paths.interim.mkdir()
    write_trained_model(params.paths.model, tiny_model_dir)
    return params


def write_pool(params, texts: list[str]) -> None:
    pd.DataFrame({"text": texts}).to_parquet(params.paths.interim / "unlabeled.parquet", index=False)


def test_main_writes_tasks_config_and_ranking(selecting):
    from label_studio_sdk.label_interface import LabelInterface

    params = selecting
    texts = [f"the {item} is {w} and {v}" for item in ("kettle", "lamp", "mouse")
             for w, v in (("great", "okay"), ("awful", "fine"), ("plain", "sturdy"))]
    write_pool(params, [*texts, texts[0]])  # an exact twin: never chosen beside its original
    summary = select.main(params)
    assert summary == {"pool": 10, "chosen": 4}
    out = params.paths.select
    ranking = pd.read_csv(out / RANKING, keep_default_na=False)
    assert len(ranking) == 10 and ranking["rank"].tolist() == list(range(1, 11))
    assert ranking["uncertainty"].is_monotonic_decreasing
    assert ranking["chosen"].sum() == 4
    twins = ranking[ranking["text"] == texts[0]]
    assert twins["chosen"].sum() <= 1  # cosine 1.0 > 0.99: the later one is a near-duplicate
    # With room for every row, only the twin is left out (the tiny BERT's other pairs: <= 0.988).
    everything = params.model_copy(update={"select": params.select.model_copy(update={"top_n": 10})})
    assert select.main(everything) == {"pool": 10, "chosen": 9}
    ranking_all = pd.read_csv(out / RANKING, keep_default_na=False)
    skipped = ranking_all[~ranking_all["chosen"]]
    assert skipped["text"].tolist() == [texts[0]]
    assert skipped["near_duplicate_of"].tolist() == [row_id(texts[0])]
    select.main(params)
    tasks = json.loads((out / "tasks.json").read_text())
    chosen = ranking[ranking["chosen"]]
    assert [t["data"]["text"] for t in tasks] == chosen["text"].tolist()  # least sure first
    assert all(t["data"]["row_id"] == row_id(t["data"]["text"]) for t in tasks)
    interface = LabelInterface((out / "config.xml").read_text())
    interface.validate()
    assert interface.get_control("label").labels == LABELS
    versions = set()
    for task, row in zip(tasks, chosen.itertuples(), strict=True):
        assert interface.validate_task({"data": task["data"]})
        prediction = task["predictions"][0]
        assert interface.validate_prediction(prediction, return_errors=True) == []
        assert prediction["result"][0]["value"]["choices"] == [row.predicted_label]
        assert prediction["score"] == pytest.approx(row.score) and 1 / 3 <= prediction["score"] <= 1
        versions.add(prediction["model_version"])
    assert len(versions) == 1 and versions.pop().startswith("lmforge-")


def test_an_empty_pool_writes_no_tasks_and_loads_no_model(selecting):
    params = selecting
    write_pool(params, [])
    (params.paths.model / "config.json").unlink()  # loading it would fail
    assert select.main(params) == {"pool": 0, "chosen": 0}
    assert json.loads((params.paths.select / "tasks.json").read_text()) == []
    assert pd.read_csv(params.paths.select / RANKING).empty
