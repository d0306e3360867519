"""The round trip against a real Label Studio: stage select's tasks and config are imported through
its API, annotated (a majority, a tie, a skip, a pre-annotation accepted), exported as JSON, and
ingest reads the export.

Label Studio is heavy and pins its own libraries, so it lives in a venv of its own:

    python3 -m venv /tmp/ls-venv && /tmp/ls-venv/bin/pip install label-studio

(or point LMFORGE_LABEL_STUDIO at another `label-studio` executable). Without it the test skips,
saying so. The server runs on 127.0.0.1 with a data folder under the test's tmp_path and is stopped
by the test, even when it fails (tests/conftest.py's process-group registry).
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from lmforge.params import parse_params
from stages import ingest, select
from tests.conftest import LABELS, make_rows, start_process_group, stop_process_group, write_trained_model
from tests.helpers import free_port, wait_healthy

LABEL_STUDIO = Path(os.environ.get("LMFORGE_LABEL_STUDIO", "/tmp/ls-venv/bin/label-studio"))
TOKEN = "lmforge-test-token-0123456789"
STARTUP_S = 300  # the first start migrates a fresh database: ~80 s on 2 busy cores


def api(base: str, method: str, path: str, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{base}{path}", data=data, method=method, headers={
        "Authorization": f"Token {TOKEN}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read() or b"null")


@pytest.fixture
def label_studio(tmp_path):
    """The base URL of a Label Studio server started for this test alone."""
    if not LABEL_STUDIO.is_file():
        pytest.skip(f"Label Studio is not installed at {LABEL_STUDIO} (python3 -m venv /tmp/ls-venv "
                    "&& /tmp/ls-venv/bin/pip install label-studio, or set LMFORGE_LABEL_STUDIO)")
    port, home = free_port(), tmp_path / "ls-home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "LABEL_STUDIO_BASE_DATA_DIR": str(home / "data")}
    log = tmp_path / "label-studio.log"
    with log.open("w") as out:
        proc = start_process_group(
            [str(LABEL_STUDIO), "start", "--no-browser", "--data-dir", str(home / "data"),
             "--internal-host", "127.0.0.1", "--port", str(port), "--username", "test@example.com",
             "--password", "lmforge-test-pw", "--user-token", TOKEN, "--enable-legacy-api-token"],
            env=env, stdout=out, stderr=out)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", proc, log, STARTUP_S, "Label Studio")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process_group(proc)


@pytest.mark.slow
def test_select_tasks_round_trip_through_label_studio_into_ingest(tmp_path, tiny_model_dir,
                                                                  label_studio):
    pool = [f"the {item} is {w} and {v}" for item in ("kettle", "lamp")
            for w, v in (("great", "okay"), ("awful", "fine"))]
    names = {"interim": "interim", "model": "model", "select": "select"}
    params = parse_params({"paths": {k: str(tmp_path / v) for k, v in names.items()},
                           "model": {"source": str(tiny_model_dir)}, "prepare": {"max_length": 32},
                           "select": {"top_n": 4, "max_similarity": None}})
    params.paths.interim.mkdir()
    pd.DataFrame({"text": pool}).to_parquet(params.paths.interim / "unlabeled.parquet")
    write_trained_model(params.paths.model, tiny_model_dir)
    select.main(params)
    tasks = json.loads((params.paths.select / "tasks.json").read_text())
    config = (params.paths.select / "config.xml").read_text()

    project = api(label_studio, "POST", "/api/projects/", {"title": "lmforge round trip",
                                                            "label_config": config})
    imported = api(label_studio, "POST", f"/api/projects/{project['id']}/import", tasks)
    assert imported["task_count"] == 4 and imported["prediction_count"] == 4
    listed = api(label_studio, "GET", f"/api/tasks/?project={project['id']}&page_size=100")["tasks"]
    by_text = {t["data"]["text"]: t for t in listed}
    assert set(by_text) == set(pool)
    assert all(t["data"]["row_id"] for t in listed)

    def annotate(text: str, label: str | None) -> None:
        result = [] if label is None else [{"from_name": "label", "to_name": "text",
                                            "type": "choices", "value": {"choices": [label]}}]
        api(label_studio, "POST", f"/api/tasks/{by_text[text]['id']}/annotations/",
            {"result": result, "was_cancelled": label is None})

    for label in ("positive", "positive", "negative"):  # a majority of two
        annotate(pool[0], label)
    annotate(pool[1], "negative")  # a tie: nobody wins
    annotate(pool[1], "neutral")
    annotate(pool[2], None)  # skipped: no label yet
    predicted = tasks[[t["data"]["text"] for t in tasks].index(pool[3])]["predictions"][0]
    annotate(pool[3], predicted["result"][0]["value"]["choices"][0])  # the pre-annotation accepted

    exported = api(label_studio, "GET", f"/api/projects/{project['id']}/export?exportType=JSON")
    source = tmp_path / "source"
    (source / "labelstudio").mkdir(parents=True)
    make_rows().to_csv(source / "train.csv", index=False)
    pd.DataFrame({"text": pool}).to_csv(source / "unlabeled.csv", index=False)
    (source / "labelstudio" / "project-1-export.json").write_text(json.dumps(exported))
    names = {"raw": "raw", "interim": "interim2", "manifest": "data.json"}
    manifest = ingest.main(parse_params({"data": {"source": str(source)},
                                         "paths": {k: str(tmp_path / v) for k, v in names.items()}}))

    studio = manifest["label_studio"]
    assert {k: studio[k] for k in ("tasks", "annotations", "skipped", "unannotated", "ties",
                                   "labelled", "new_rows")} == {
        "tasks": 4, "annotations": 6, "skipped": 1, "unannotated": 1, "ties": 1, "labelled": 2,
        "new_rows": 2}
    train = pd.concat(pd.read_parquet(tmp_path / "interim2" / f"{s}.parquet")
                      for s in ("train", "validation", "test"))
    label_of = dict(zip(train.text, train.label, strict=True))
    assert label_of[pool[0]] == "positive" and label_of[pool[3]] in LABELS
    assert pool[1] not in label_of and pool[2] not in label_of
    # Every pool text is now labelled or waiting in Label Studio: nothing is left to select.
    assert manifest["unlabeled"] == {"rows": 0, "dropped": {"empty": 0, "duplicate": 0,
                                                            "labelled": 2, "in_label_studio": 2}}
