"""Label Studio, both ways: the labelling config and import tasks lmforge writes (stage audit: rows to
check again; stage select: rows to label next), and the JSON exports stage ingest reads back.

An export is Label Studio's "JSON" export: a list of tasks, each with ``data`` (the text under the
key ``data.text_column`` names: the config reads ``$text``) and ``annotations``, one per annotator,
whose ``result`` holds one ``choices`` item. Every shape lmforge cannot read is a UserError naming
the file, the task (its position and Label Studio id) and what to do. Resolving the annotators of a
task (majority vote, ties, agreement) is plain counting on ``TaskVotes``, with no file involved.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import quoteattr

from lmforge.common import UserError

FROM_NAME, TO_NAME = "label", "text"  # the control and object names of the config lmforge writes
CHOICES = "choices"
EXPORT_HINT = "export the project from Label Studio as 'JSON' (not JSON_MIN, CSV or a task file)"


def row_id(text: str) -> str:
    """A row's id: 12 hex digits of its (cleaned) text's SHA-256, the same in every run, split and
    file (the audit report, Label Studio tasks), so a row can be followed across rounds."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def labelling_config(labels: list[str], text_key: str) -> str:
    """The labelling config for ``labels``: one text, one required single choice per task."""
    choices = "\n".join(f"    <Choice value={quoteattr(label)}/>" for label in labels)
    return (
        "<View>\n"
        f"  <Text name=\"{TO_NAME}\" value={quoteattr('$' + text_key)}/>\n"
        f"  <Choices name=\"{FROM_NAME}\" toName=\"{TO_NAME}\" choice=\"single-radio\" "
        "required=\"true\" showInLine=\"true\">\n"
        f"{choices}\n"
        "  </Choices>\n"
        "</View>\n"
    )


def choice_result(label: str) -> list[dict]:
    """A ``result`` choosing ``label`` with the config above (annotations and predictions alike)."""
    return [{"from_name": FROM_NAME, "to_name": TO_NAME, "type": CHOICES,
             "value": {CHOICES: [label]}}]


def make_task(text: str, text_key: str, row_id: str, label: str | None = None,
              score: float | None = None, model_version: str | None = None) -> dict:
    """An import task; given a label, the model's prediction rides along as a pre-annotation."""
    task: dict = {"data": {text_key: text, "row_id": row_id}}
    if label is not None:
        task["predictions"] = [{"model_version": model_version, "score": round(float(score), 6),
                                "result": choice_result(label)}]
    return task


@dataclass
class TaskVotes:
    """One exported task: its text, the choice of each submitted annotation, the skipped ones."""

    text: str
    votes: Counter = field(default_factory=Counter)
    skipped: int = 0  # cancelled ("skip" in Label Studio) or submitted with nothing chosen


def majority(votes: Counter) -> str | None:
    """The label most annotators chose; None for no vote or a tie at the top."""
    ranked = votes.most_common(2)
    if not ranked or (len(ranked) == 2 and ranked[0][1] == ranked[1][1]):
        return None
    return ranked[0][0]


def agreement(tasks: list[TaskVotes]) -> dict:
    """Agreement between annotators over tasks with two or more votes.

    ``overall``: the chance that two annotators of a task chose the same label; per class, the
    chance that a second annotator chose the class too, given one did (specific agreement:
    sum n_c (n_c - 1) / sum n_c (n - 1) over tasks, n_c the votes for c among n).
    """
    multi = [t.votes for t in tasks if sum(t.votes.values()) >= 2]
    if not multi:
        return {"tasks": 0}
    same = sum(c * (c - 1) for v in multi for c in v.values())
    pairs = sum(n * (n - 1) for n in (sum(v.values()) for v in multi))
    per_class = {}
    for label in sorted({label for v in multi for label in v}):
        chose = sum(v[label] * (sum(v.values()) - 1) for v in multi)
        per_class[label] = sum(v[label] * (v[label] - 1) for v in multi) / chose
    return {"tasks": len(multi), "overall": same / pairs, "per_class": per_class}


def read_export(path: Path, text_key: str, known: set[str] | None) -> list[TaskVotes]:
    """The tasks of one Label Studio JSON export, each with its votes; any other shape is refused.

    ``known``: the label set the choices must belong to (None: any choice is a label).
    """
    try:
        tasks = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; {EXPORT_HINT}") from None
    except ValueError as err:
        raise UserError(f"{path}: cannot be read as JSON: {err}") from None
    if not isinstance(tasks, list):
        raise UserError(f"{path}: a Label Studio export is a JSON list of tasks; this file holds "
                        f"a JSON {json_kind(tasks)}; {EXPORT_HINT}")
    if not tasks:
        raise UserError(f"{path}: the export holds no tasks")
    read = [read_task(task, f"{path}: task {i}", text_key, known) for i, task in enumerate(tasks)]
    if not any(t.votes for t in read):
        skipped = sum(t.skipped for t in read)
        raise UserError(f"{path}: no task has a submitted annotation ({len(read)} tasks, {skipped} "
                        "skipped annotations): label some tasks in Label Studio, then export again")
    return read


def json_kind(value: object) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def read_task(task: object, where: str, text_key: str, known: set[str] | None) -> TaskVotes:
    """One task: its text and one vote per submitted annotation."""
    if not isinstance(task, dict):
        nested = " (a list inside the list of tasks: nested exports?)" if isinstance(task, list) else ""
        raise UserError(f"{where}: a task is a JSON object with 'data' and 'annotations', got a "
                        f"{json_kind(task)}{nested}")
    where = f"{where} (id {task['id']})" if "id" in task else where
    data = task.get("data")
    if not isinstance(data, dict):
        raise UserError(f"{where}: no 'data' object: not a Label Studio JSON export; {EXPORT_HINT}")
    if text_key not in data:
        raise UserError(f"{where}: its data has no '{text_key}' (keys: {sorted(data)}); "
                        f"data.text_column names the key the labelling config reads (${text_key})")
    text = data[text_key]
    if not isinstance(text, str):
        raise UserError(f"{where}: data '{text_key}' is a JSON {json_kind(text)}, not text: "
                        f"{str(text)[:60]!r}")
    annotations = task.get("annotations")
    if not isinstance(annotations, list):
        what = "no 'annotations' list" if annotations is None else (
            f"'annotations' is a JSON {json_kind(annotations)}, not a list")
        raise UserError(f"{where}: {what}: an import file or a predictions-only export holds no "
                        f"labels; {EXPORT_HINT}")
    out = TaskVotes(text)
    for j, annotation in enumerate(annotations):
        label = read_annotation(annotation, f"{where}, annotation {j}", known)
        if label is None:
            out.skipped += 1
        else:
            out.votes[label] += 1
    return out


def read_annotation(annotation: object, where: str, known: set[str] | None) -> str | None:
    """The label one annotation chose; None when it was skipped or chose nothing."""
    if not isinstance(annotation, dict):
        raise UserError(f"{where}: an annotation is a JSON object with a 'result' list, got a "
                        f"{json_kind(annotation)}")
    if annotation.get("was_cancelled"):
        return None
    result = annotation.get("result")
    if not isinstance(result, list):
        raise UserError(f"{where}: 'result' is missing or not a list (got a JSON "
                        f"{json_kind(result)}); {EXPORT_HINT}")
    items = [read_result(item, f"{where}, result {k}") for k, item in enumerate(result)]
    chosen = [(name, label) for name, labels in items for label in labels]
    controls = sorted({name for name, _ in chosen})
    if len(controls) > 1:
        raise UserError(f"{where}: choices from {len(controls)} controls {controls}: lmforge reads "
                        "one single-choice control per task (the config it writes has one)")
    if len(chosen) > 1:
        raise UserError(f"{where}: {len(chosen)} choices {[c for _, c in chosen]} in one annotation: "
                        "a classifier takes one label per text (use choice=\"single\" in the config)")
    if not chosen:
        return None
    label = chosen[0][1]
    if known is not None and label not in known:
        raise UserError(f"{where}: choice {label!r} is not a label: the label set is "
                        f"{sorted(known)} (data.labels, or the labels of the other sources); fix "
                        "the annotation in Label Studio, or add the label to data.labels")
    return label


def read_result(item: object, where: str) -> tuple[str | None, list[str]]:
    """(control name, labels) of one result item, which must be a choice."""
    if not isinstance(item, dict):
        raise UserError(f"{where}: a result item is a JSON object (from_name, to_name, type, value), "
                        f"got a {json_kind(item)}: nested results are not a Label Studio export")
    kind = item.get("type")
    if kind != CHOICES:
        raise UserError(f"{where}: a result of type {kind!r} (from_name {item.get('from_name')!r}): "
                        "lmforge reads choices annotations only (a <Choices> control)")
    value = item.get("value")
    labels = value.get(CHOICES) if isinstance(value, dict) else None
    if not isinstance(labels, list) or not all(isinstance(c, str) and c for c in labels):
        raise UserError(f"{where}: value.choices must be a list of label names, got {labels!r}"
                        + (" (nested lists: a taxonomy?)" if isinstance(labels, list) else ""))
    return str(item.get("from_name")), labels
