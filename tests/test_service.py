"""The HTTP service, end to end: a real `bentoml serve bento.service:Classifier` on 127.0.0.1.

A tiny model is packaged into a temporary BentoML store once per module; the server starts from the
repo root (as a user runs it) and is killed, with its worker processes, at the end.
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lmforge.params import parse_params
from tests.conftest import LABELS, REPO, tmp_paths, write_trained_model
from tests.helpers import (
    HOSTILE_BODIES,
    RUN_ID,
    assert_every_example_works,
    assert_hostile_body_refused,
    package_tiny,
    raw_request,
    serving,
    write_upstream,
)

httpx = pytest.importorskip("httpx")  # a BentoML dependency

MAX_TEXTS, MAX_CHARS, MAX_LENGTH = 8, 200, 32
TEXTS = [
    "the kettle is great and fast", "awful lamp , it broke", "okay , the mouse arrived",
    "love the sturdy jacket", "slow noisy charger returned", "plain average novel 7",
]


@pytest.fixture(scope="module")
def packaged(tmp_path_factory, tiny_model_dir):
    """A tiny model packaged into a fresh store: (params, BentoML home, bento.json contents)."""
    root = tmp_path_factory.mktemp("service")
    params = parse_params({
        "paths": tmp_paths(root),
        "prepare": {"max_length": MAX_LENGTH},
        "serve": {"max_texts": MAX_TEXTS, "max_chars": MAX_CHARS, "max_batch_size": 32},
    })
    write_trained_model(params.paths.model, tiny_model_dir)
    write_upstream(params)
    home = root / "bentoml"
    return params, home, package_tiny(params, home)


@pytest.fixture(scope="module")
def server(packaged):
    """`bentoml serve bento.service:Classifier` from the repo root: (base url, bento.json)."""
    params, home, info = packaged
    with serving("bento.service:Classifier", home, REPO, home.parent / "serve.log") as url:
        yield url, info


def classify(url: str, body, **kw) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(f"{url}/classify", content=body, timeout=30,
                          headers={"content-type": "application/json"})
    return httpx.post(f"{url}/classify", json=body, timeout=30, **kw)


def test_classify_answers_each_text_in_order(server):
    url, _ = server
    resp = classify(url, {"texts": TEXTS})
    assert resp.status_code == 200, resp.text
    preds = resp.json()
    assert len(preds) == len(TEXTS)
    assert all(p["label"] in LABELS and 0 <= p["score"] <= 1 for p in preds)
    assert all(p["scores"] is None for p in preds)
    # Texts score differently, so the reversed request shows each answer belongs to its text.
    assert len({round(p["score"], 3) for p in preds}) > 1
    backwards = classify(url, {"texts": TEXTS[::-1]}).json()[::-1]
    assert [p["label"] for p in backwards] == [p["label"] for p in preds]
    assert [p["score"] for p in backwards] == pytest.approx([p["score"] for p in preds], abs=1e-4)


def test_all_scores_is_a_distribution_over_the_labels(server):
    url, _ = server
    preds = classify(url, {"texts": TEXTS[:3], "all_scores": True}).json()
    for p in preds:
        assert list(p["scores"]) == LABELS
        assert sum(p["scores"].values()) == pytest.approx(1, abs=1e-4)
        assert p["label"] == max(p["scores"], key=p["scores"].get)
        assert p["score"] == pytest.approx(max(p["scores"].values()))


def test_text_longer_than_the_model_is_truncated(server):
    url, _ = server
    text = " ".join(["7"] * 99)  # 99 tokens: above max_length (32) and the 64 positions
    assert len(text) <= MAX_CHARS
    resp = classify(url, {"texts": [text]})
    assert resp.status_code == 200, resp.text


def batch_histogram(url: str) -> tuple[float, float]:
    """(batches, requests in them) of the service's batcher so far, from /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = {}
    for kind in ("count", "sum"):
        m = re.search(rf"^lmforge_batch_requests_{kind}(?:{{[^}}]*}})? (\S+)$", text, re.M)
        found[kind] = float(m.group(1)) if m else 0.0
    return found["count"], found["sum"]


def test_concurrent_requests_are_answered_and_batched(server):
    url, _ = server
    expected = {t: p for t, p in zip(TEXTS, classify(url, {"texts": TEXTS}).json(), strict=True)}
    jobs = [TEXTS[i % len(TEXTS):] + TEXTS[: i % len(TEXTS)] for i in range(24)]  # rotations
    calls0, requests0 = batch_histogram(url)
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda texts: classify(url, {"texts": texts[:4]}), jobs))
    calls, requests = batch_histogram(url)
    calls, requests = calls - calls0, requests - requests0
    print(f"adaptive batching: {requests:.0f} concurrent requests in {calls:.0f} batches")
    for texts, resp in zip(jobs, answers, strict=True):
        assert resp.status_code == 200, resp.text
        assert [p["label"] for p in resp.json()] == [expected[t]["label"] for t in texts[:4]]
        assert [p["score"] for p in resp.json()] == pytest.approx(
            [expected[t]["score"] for t in texts[:4]], abs=1e-4)
    assert requests == len(jobs)
    assert calls < requests, "adaptive batching never merged two requests into one forward pass"


@pytest.mark.parametrize(("body", "message"), [
    ({"texts": []}, "at least 1 item"),
    ({"texts": ["fine"] * (MAX_TEXTS + 1)}, f"at most {MAX_TEXTS} items"),
    ({"texts": ["fine", "x" * (MAX_CHARS + 1)]}, f"at most {MAX_CHARS} characters"),
    ({"texts": "a single string"}, "valid"),
    ({"texts": ["fine", 3]}, "valid string"),
    ({"texts": ["fine"], "all_scores": "maybe"}, "valid boolean"),
    ({"all_scores": True}, "Field required"),
    ({"texts": ["fine"], "all_score": True}, "Extra inputs are not permitted"),
    (b'{"texts": ["fine"', "Invalid JSON"),
])
def test_bad_request_is_a_4xx_naming_the_problem(server, body, message):
    url, _ = server
    resp = classify(url, body)
    assert 400 <= resp.status_code < 500, resp.text
    assert message in resp.text


@pytest.mark.parametrize(("body", "content_type"), [c[1:] for c in HOSTILE_BODIES],
                         ids=[c[0] for c in HOSTILE_BODIES])
def test_hostile_body_is_a_4xx_not_a_500(server, body, content_type):
    url, _ = server
    assert_hostile_body_refused(f"{url}/classify", body, content_type)


def test_openapi_page_has_a_working_example_for_every_endpoint(server):
    url, _ = server
    assert_every_example_works(url, {"/classify", "/metadata"}, timeout_s=30)


def test_a_bad_request_is_one_warning_line_in_the_server_log(server, packaged):
    """BentoML logs a refused request as an ERROR with a traceback; ours is a WARNING line naming
    the problem (bento/limits.py ClientErrorsAsWarnings; tests/test_api_docs.py has the 500)."""
    url, _ = server
    log = packaged[1].parent / "serve.log"
    assert classify(url, {"texts": ["fine"], "all_scorez": True}).status_code == 400
    deadline, lines = time.monotonic() + 10, []
    while not lines and time.monotonic() < deadline:  # the worker's lines reach the file async
        lines = [line for line in log.read_text().splitlines() if "all_scorez" in line]
        time.sleep(0.2)
    assert len(lines) == 1, log.read_text()[-3000:]
    assert "[WARNING]" in lines[0]
    assert "refused POST /classify: 400 all_scorez: Extra inputs are not permitted" in lines[0]
    assert "Traceback" not in log.read_text() and "Exception on" not in log.read_text()


def test_metadata_names_the_model_and_its_lineage(server):
    url, info = server
    resp = httpx.post(f"{url}/metadata", timeout=10)
    assert resp.status_code == 200, resp.text
    meta = resp.json()
    assert meta["model_tag"] == info["model_tag"]
    assert meta["labels"] == LABELS
    assert meta["lineage"]["mlflow_run_id"] == RUN_ID
    assert meta["limits"]["max_texts"] == MAX_TEXTS
    assert meta["runtime"] == "torch"


def test_built_bento_serves_its_pinned_model_by_tag(server, packaged):
    """The deployment path: the Bento alone (outside the repo), after a newer model was packaged."""
    params, home, first = packaged
    newer = package_tiny(params, home)
    assert newer["model_tag"] != first["model_tag"]
    with serving(first["bento_tag"], home, home.parent, home.parent / "serve_bento.log") as url:
        meta = httpx.post(f"{url}/metadata", timeout=10).json()
        resp = classify(url, {"texts": TEXTS[:2]})
    assert meta["model_tag"] == first["model_tag"]
    assert resp.status_code == 200 and len(resp.json()) == 2


# --- security: body size and binding ----------------------------------------------------------


def test_oversized_body_is_refused_before_it_is_read(server):
    url, _ = server
    # 50 MB announced, 1 KB sent: a 413 can only come from the headers, nothing was parsed.
    head = ("POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {50 * 2**20}\r\n\r\n")
    started = time.monotonic()
    answer = raw_request(url, head, b'{"texts": ["' + b"x" * 1024)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"over this service's limit" in answer
    assert time.monotonic() - started < 10
    # Without a Content-Length (chunked), reading stops at the limit.
    chunked = "POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"%x\r\n%s\r\n" % (4096, b"x" * 4096)
    assert raw_request(url, chunked, chunk * 64).startswith(b"HTTP/1.1 413")
    assert classify(url, {"texts": ["still serving"]}).status_code == 200


def test_largest_valid_request_fits_under_the_body_limit(server):
    url, _ = server
    # Non-ASCII JSON is escaped: one emoji is 12 bytes ("\\ud83d\\ude00"), the worst case per char.
    body = json.dumps({"texts": ["\U0001F600" * MAX_CHARS] * MAX_TEXTS, "all_scores": False})
    assert len(body) > 12 * MAX_CHARS * MAX_TEXTS
    resp = classify(url, body.encode())
    assert resp.status_code == 200, resp.text[:300]


def listening_addresses(port: int) -> set[str]:
    """Hex local addresses of sockets listening on ``port`` (Linux /proc), e.g. 0100007F."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            addr, hex_port = fields[1].split(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(addr)
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux /proc/net/tcp")
def test_service_binds_loopback_unless_told_otherwise(packaged):
    params, home, _ = packaged
    log = home.parent / "serve_default_host.log"
    with serving("bento.service:Classifier", home, REPO, log, host=None) as url:
        port = int(url.rsplit(":", 1)[1])
        assert listening_addresses(port) == {"0100007F"}  # 127.0.0.1 only, not 0.0.0.0
