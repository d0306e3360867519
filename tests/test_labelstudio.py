"""Label Studio both ways: the config and tasks lmforge writes pass label-studio-sdk's own parser and
validators, and every export shape lmforge cannot read is refused with a message naming the file,
the task and what to do. Reading an export, majority votes and agreement are plain functions here;
ingest's use of them is tests/test_labelling.py's, a real Label Studio server test_labelstudio_server.py's.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from lmforge.common import UserError
from lmforge.data.labelstudio import (
    TaskVotes,
    agreement,
    labelling_config,
    majority,
    make_task,
    read_export,
    row_id,
)
from lmforge.data.sources import is_label_studio_export

LABELS = ["negative", "neutral", "positive"]


def choice(label: str, cancelled: bool = False) -> dict:
    """One annotation as Label Studio exports it (extra keys included: lmforge ignores them)."""
    return {"id": 1, "completed_by": 1, "was_cancelled": cancelled, "ground_truth": False,
            "result": [] if cancelled else [{"from_name": "label", "to_name": "text",
                                             "type": "choices", "value": {"choices": [label]}}]}


def export(path, tasks) -> object:
    path.write_text(json.dumps(tasks))
    return path


def test_config_and_tasks_pass_label_studio_sdk_validation():
    from label_studio_sdk.label_interface import LabelInterface

    labels = [*LABELS, 'odd & "quoted" <label>']  # XML escaping is the config's job
    interface = LabelInterface(labelling_config(labels, "review"))
    interface.validate()  # schema, unique names, toName pointing at a tag
    assert interface.get_control("label").labels == labels
    assert interface.get_object("text").value == "$review"
    task = make_task("Great blender.", "review", row_id("Great blender."), labels[3], 0.91, "m-1")
    assert interface.validate_task({"data": task["data"]})  # the config's $review is in the data
    prediction = task["predictions"][0]
    assert interface.validate_prediction(prediction, return_errors=True) == []
    assert prediction["model_version"] == "m-1" and prediction["score"] == 0.91
    # The validator is not a rubber stamp: a choice outside the config is caught.
    wrong = make_task("x", "review", "id", "no-such-label", 0.5, "m-1")["predictions"][0]
    assert interface.validate_prediction(wrong, return_errors=True)
    assert not interface.validate_task({"data": {"text": "the key the config does not read"}})


def test_a_task_without_a_prediction_is_plain_data():
    assert make_task("t", "text", "abc") == {"data": {"text": "t", "row_id": "abc"}}
    assert row_id("t") == row_id("t") != row_id("t ") and len(row_id("t")) == 12


def test_majority_drops_ties_and_empty_votes():
    assert majority(Counter({"positive": 2, "negative": 1})) == "positive"
    assert majority(Counter({"positive": 1})) == "positive"
    assert majority(Counter({"positive": 1, "negative": 1})) is None
    assert majority(Counter()) is None


def test_agreement_overall_and_per_class():
    tasks = [TaskVotes("a", Counter({"positive": 2, "negative": 1})),
             TaskVotes("b", Counter({"neutral": 1, "negative": 1})),
             TaskVotes("c", Counter({"neutral": 2})),
             TaskVotes("d", Counter({"positive": 1}))]  # one annotator: no pair to agree
    got = agreement(tasks)
    # pairs that agree / ordered pairs: (2 + 0 + 2) / (6 + 2 + 2)
    assert got["tasks"] == 3 and got["overall"] == pytest.approx(0.4)
    # positive: chosen 2 times on a, both with one other positive -> 2 / (2 * 2) = 0.5
    assert got["per_class"] == pytest.approx({"negative": 0.0, "neutral": 2 / 3, "positive": 0.5})
    assert agreement(tasks[3:]) == {"tasks": 0}


def test_read_export_counts_votes_and_skips(tmp_path):
    path = export(tmp_path / "e.json", [
        {"id": 7, "data": {"text": "t1"}, "annotations": [choice("positive"), choice("positive"),
                                                         choice("negative"), choice("x", True)]},
        {"id": 8, "data": {"text": "t2"}, "annotations": [],
         "predictions": [{"result": choice("neutral")["result"]}]},  # a prediction is no label
        {"id": 9, "data": {"text": "t3"}, "annotations": [{"result": []}]},  # nothing chosen
    ])
    t1, t2, t3 = read_export(path, "text", set(LABELS))
    assert (t1.text, t1.votes, t1.skipped) == ("t1", Counter({"positive": 2, "negative": 1}), 1)
    assert (t2.votes, t2.skipped) == (Counter(), 0)
    assert (t3.votes, t3.skipped) == (Counter(), 1)


def test_exports_are_told_from_json_lines_by_their_shape(tmp_path):
    assert is_label_studio_export(export(tmp_path / "a.json", [{"data": {}, "annotations": []}]))
    one_task = tmp_path / "b.json"  # a task object without its list: refused by the reader, by name
    one_task.write_text(json.dumps({"data": {"text": "t"}, "annotations": []}))
    assert is_label_studio_export(one_task)
    rows = tmp_path / "c.json"
    rows.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    assert not is_label_studio_export(rows)
    assert not is_label_studio_export(tmp_path / "missing.json")


def task(**over) -> dict:
    return {"id": 3, "data": {"text": "a fine kettle"}, "annotations": [choice("positive")]} | over


RESULT = {"from_name": "label", "to_name": "text", "type": "choices"}
MALFORMED = [
    ("not a list", {"data": {"text": "t"}, "annotations": []},
     "a Label Studio export is a JSON list of tasks; this file holds a JSON object"),
    ("a string", "tasks", "holds a JSON string"),
    ("no tasks", [], "the export holds no tasks"),
    ("nested task lists", [[task()]], r"task 0: a task is a JSON object .* got a list \(a list inside"),
    ("task is a number", [5], "task 0: a task is a JSON object with 'data' and 'annotations', got a number"),
    ("no data", [{"id": 3, "text": "t", "label": "positive"}],
     r"task 0 \(id 3\): no 'data' object: not a Label Studio JSON export; export the project"),
    ("task without text", [task(data={"review": "t"})],
     r"task 0 \(id 3\): its data has no 'text' \(keys: \['review'\]\); data.text_column"),
    ("text not a string", [task(data={"text": 42})], "data 'text' is a JSON number, not text: '42'"),
    ("null text", [task(data={"text": None})], "data 'text' is a JSON null, not text"),
    ("no annotations key", [{"id": 3, "data": {"text": "t"}}],
     r"task 0 \(id 3\): no 'annotations' list: an import file or a predictions-only export"),
    ("annotations not a list", [task(annotations={"result": []})],
     "'annotations' is a JSON object, not a list"),
    ("no annotation anywhere", [task(annotations=[]), task(annotations=[choice("x", True)])],
     r"no task has a submitted annotation \(2 tasks, 1 skipped annotations\): label some tasks"),
    ("annotation not an object", [task(annotations=["positive"])],
     "annotation 0: an annotation is a JSON object with a 'result' list, got a string"),
    ("no result", [task(annotations=[{"id": 1}])], "annotation 0: 'result' is missing or not a list"),
    ("nested results", [task(annotations=[{"result": [[RESULT | {"value": {"choices": ["positive"]}}]]}])],
     "result 0: a result item is a JSON object .* got a list: nested results"),
    ("not a choice", [task(annotations=[{"result": [RESULT | {"type": "labels", "from_name": "ner",
                                                              "value": {"labels": ["PER"]}}]}])],
     "a result of type 'labels' \\(from_name 'ner'\\): lmforge reads choices annotations only"),
    ("taxonomy", [task(annotations=[{"result": [RESULT | {"value": {"choices": [["a", "b"]]}}]}])],
     r"value.choices must be a list of label names, got \[\['a', 'b'\]\] \(nested lists"),
    ("no value", [task(annotations=[{"result": [RESULT]}])], "value.choices must be a list of label names"),
    ("empty choice", [task(annotations=[{"result": [RESULT | {"value": {"choices": [""]}}]}])],
     "value.choices must be a list of label names"),
    ("multi-label",
     [task(annotations=[{"result": [RESULT | {"value": {"choices": ["positive", "neutral"]}}]}])],
     r"2 choices \['positive', 'neutral'\] in one annotation: a classifier takes one label"),
    ("two controls", [task(annotations=[{"result": [RESULT | {"value": {"choices": ["positive"]}},
                                                    RESULT | {"from_name": "topic",
                                                              "value": {"choices": ["kitchen"]}}]}])],
     r"choices from 2 controls \['label', 'topic'\]: lmforge reads one"),
    ("unknown choice", [task(annotations=[choice("postive")])],
     r"task 0 \(id 3\), annotation 0: choice 'postive' is not a label: the label set is "
     r"\['negative', 'neutral', 'positive'\] \(data.labels"),
]


@pytest.mark.parametrize("content, message", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_every_malformed_export_is_refused_with_a_clear_message(tmp_path, content, message):
    path = export(tmp_path / "project-1.json", content)
    with pytest.raises(UserError, match=message) as err:
        read_export(path, "text", set(LABELS))
    assert str(err.value).startswith(f"{path}: ")  # the file is always named first


def test_unreadable_json_is_named(tmp_path):
    path = tmp_path / "e.json"
    path.write_text('[{"data": {"text": "t"}, "annotations": [}]')
    with pytest.raises(UserError, match=r"e.json: cannot be read as JSON: Expecting value: line 1"):
        read_export(path, "text", None)
    path.write_bytes(b'[{"data": {"text": "caf\xe9"}}]')
    with pytest.raises(UserError, match="e.json: not UTF-8 text"):
        read_export(path, "text", None)


def test_without_a_known_label_set_any_choice_is_a_label(tmp_path):
    path = export(tmp_path / "e.json", [task(annotations=[choice("brand-new")])])
    assert read_export(path, "text", None)[0].votes == Counter({"brand-new": 1})
