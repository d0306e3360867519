"""The causal LM service end to end: a real `bentoml serve bento.generate:Generator` on 127.0.0.1.

A tiny GPT-2 (random weights, byte-level BPE) is packaged by the package stage into a temporary
BentoML store once per module; one server starts from the repo root and is killed, with its worker
processes, at the end. The prompt handling functions (bento/prompts.py) are tested directly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from bento.prompts import fit_context, format_prompt, left_pad, stop_id_set, until_stop
from tests.conftest import REPO
from tests.helpers import (
    HOSTILE_BODIES,
    LM_METRICS,
    RUN_ID,
    TEMPLATE,
    assert_every_example_works,
    assert_hostile_body_refused,
    lm_params,
    package_tiny,
    raw_request,
    serving,
    write_trained_lm,
    write_upstream,
)

httpx = pytest.importorskip("httpx")  # a BentoML dependency

MAX_TEXTS, MAX_CHARS, MAX_NEW, CONTEXT = 4, 300, 16, 64
PROMPTS = ["say hi", "name a fruit", "the kettle"]


# --- prompt handling, without a server ---------------------------------------------------------


def test_pairs_prompts_are_wrapped_in_the_training_template():
    assert format_prompt("say hi", TEMPLATE) == "### Prompt:\nsay hi\n### Response:\n"
    assert format_prompt("say hi", None) == "say hi"
    # Only the {prompt} slot is filled: braces elsewhere, and in the prompt, are kept as written.
    assert format_prompt("f({x})", '{"q": "{prompt}"}') == '{"q": "f({x})"}'


def test_prompts_are_cut_from_the_left_and_an_empty_one_gets_a_start_token():
    assert fit_context([1, 2, 3, 4, 5], 3, start_id=0) == [3, 4, 5]
    assert fit_context([1, 2], 3, start_id=0) == [1, 2]
    assert fit_context([], 3, start_id=7) == [7]
    with pytest.raises(ValueError, match="no room"):
        fit_context([1], 0, start_id=0)


def test_batch_is_padded_on_the_left_with_a_matching_mask():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=1)
    assert ids == [[5, 6, 7], [1, 1, 8]]
    assert mask == [[1, 1, 1], [0, 0, 1]]


def test_generated_ids_end_at_the_first_stop_id():
    assert until_stop([4, 5, 0, 1, 1], {0}) == ([4, 5, 0], True)
    assert until_stop([4, 5, 6], {0}) == ([4, 5, 6], False)
    assert until_stop([4, 9, 5], {0, 9}) == ([4, 9], True)
    assert stop_id_set(2, None, [3, 2]) == {2, 3}


# --- over HTTP -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    """A tiny pairs LM packaged into a fresh store: (params, BentoML home, bento.json contents)."""
    root = tmp_path_factory.mktemp("generate")
    params = lm_params(root, serve={"max_texts": MAX_TEXTS, "max_chars": MAX_CHARS,
                                    "max_new_tokens": MAX_NEW})
    write_trained_lm(params.paths.model, fmt="pairs", context=CONTEXT)
    write_upstream(params, LM_METRICS)
    home = root / "bentoml"
    return params, home, package_tiny(params, home)


@pytest.fixture(scope="module")
def server(packaged):
    """`bentoml serve bento.generate:Generator` from the repo root: (base url, bento.json)."""
    _, home, info = packaged
    with serving("bento.generate:Generator", home, REPO, home.parent / "serve.log") as url:
        yield url, info


def post(url: str, route: str, body) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(f"{url}{route}", content=body, timeout=60,
                          headers={"content-type": "application/json"})
    return httpx.post(f"{url}{route}", json=body, timeout=60)


def generate(url: str, body) -> list[dict]:
    resp = post(url, "/generate", body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_one_prompt_gets_new_text_up_to_the_default_length(server):
    url, _ = server
    [answer] = generate(url, {"prompts": ["say hi"]})
    assert set(answer) == {"text", "tokens", "finish_reason"}
    assert isinstance(answer["text"], str) and answer["text"].strip()
    assert "### Prompt:" not in answer["text"]  # only the new text, not the templated prompt
    # The tiny model never picks EOS (tests/helpers.py, write_trained_lm): it runs to the default length.
    assert answer["tokens"] == min(64, MAX_NEW) and answer["finish_reason"] == "length"


def test_greedy_is_repeatable_and_each_answer_belongs_to_its_prompt(server):
    url, _ = server
    together = generate(url, {"prompts": PROMPTS, "max_new_tokens": 8})
    assert generate(url, {"prompts": PROMPTS, "max_new_tokens": 8}) == together
    # One left-padded batch gives each prompt what it gets alone.
    alone = [generate(url, {"prompts": [p], "max_new_tokens": 8})[0] for p in PROMPTS]
    assert together == alone
    assert len({a["text"] for a in together}) > 1  # the prompts lead to different texts


def test_max_new_tokens_is_respected(server):
    url, _ = server
    for n in (1, 5, MAX_NEW):
        answers = generate(url, {"prompts": PROMPTS[:2], "max_new_tokens": n})
        assert [a["tokens"] for a in answers] == [n, n]


def test_sampling_follows_temperature_and_top_p(server):
    url, _ = server
    body = {"prompts": PROMPTS, "max_new_tokens": MAX_NEW, "temperature": 1.5, "top_p": 0.95}
    first, second = generate(url, body), generate(url, body)
    for a in first + second:  # a draw may hit EOS (about 1 in 300): the text ends there
        assert a["tokens"] == MAX_NEW if a["finish_reason"] == "length" else a["tokens"] <= MAX_NEW
    assert first != second  # 3 x 16 draws from ~300 tokens: equal only by a vanishing chance


def test_prompt_longer_than_the_context_is_cut_from_the_left(server):
    url, _ = server
    longest = "x y " * (MAX_CHARS // 4)  # hundreds of tokens: far over the 64 positions
    assert len(longest) <= MAX_CHARS
    answers = generate(url, {"prompts": [longest, ""], "max_new_tokens": MAX_NEW})
    assert [a["tokens"] for a in answers] == [MAX_NEW, MAX_NEW]  # an empty prompt works too


def test_stream_sends_the_same_text_as_generate(server):
    url, _ = server
    body = {"prompt": "name a fruit", "max_new_tokens": 12}
    with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=60) as resp:
        assert resp.status_code == 200, resp.read()
        chunks = [c for c in resp.iter_text() if c]
    whole = generate(url, {"prompts": ["name a fruit"], "max_new_tokens": 12})[0]["text"]
    assert "".join(chunks) == whole


def test_metadata_names_the_model_its_prompt_format_and_limits(server):
    url, info = server
    resp = httpx.post(f"{url}/metadata", timeout=10)
    assert resp.status_code == 200, resp.text
    meta = resp.json()
    assert meta["model_tag"] == info["model_tag"]
    assert (meta["task"], meta["format"], meta["template"], meta["context"]) == (
        "causal_lm", "pairs", TEMPLATE, CONTEXT)
    assert meta["lineage"]["mlflow_run_id"] == RUN_ID
    assert meta["lineage"]["test_perplexity"] == "123.4560"
    assert meta["limits"]["max_new_tokens"] == MAX_NEW and meta["limits"]["max_texts"] == MAX_TEXTS


@pytest.mark.parametrize(("route", "body", "field", "message"), [
    ("/generate", {"prompts": []}, "prompts", "at least 1 item"),
    ("/generate", {"prompts": ["fine"] * (MAX_TEXTS + 1)}, "prompts", f"at most {MAX_TEXTS} items"),
    ("/generate", {"prompts": ["fine", "x" * (MAX_CHARS + 1)]}, "prompts",
     f"at most {MAX_CHARS} characters"),
    ("/generate", {"prompts": "a single string"}, "prompts", "valid array"),
    ("/generate", {"prompts": ["fine", 3]}, "prompts", "valid string"),
    ("/generate", {"max_new_tokens": 4}, "prompts", "Field required"),
    ("/generate", {"prompts": ["fine"], "max_new_tokens": MAX_NEW + 1}, "max_new_tokens",
     f"less than or equal to {MAX_NEW}"),
    ("/generate", {"prompts": ["fine"], "max_new_tokens": 0}, "max_new_tokens",
     "greater than or equal to 1"),
    ("/generate", {"prompts": ["fine"], "max_new_tokens": "5"}, "max_new_tokens", "valid integer"),
    ("/generate", {"prompts": ["fine"], "max_new_tokens": 2.5}, "max_new_tokens", "valid integer"),
    ("/generate", {"prompts": ["fine"], "temperature": -0.1}, "temperature",
     "greater than or equal to 0"),
    ("/generate", {"prompts": ["fine"], "temperature": 2.5}, "temperature",
     "less than or equal to 2"),
    ("/generate", {"prompts": ["fine"], "temperature": "hot"}, "temperature", "valid number"),
    ("/generate", {"prompts": ["fine"], "top_p": 0}, "top_p", "greater than 0"),
    ("/generate", {"prompts": ["fine"], "top_p": 1.5}, "top_p", "less than or equal to 1"),
    ("/generate", {"prompts": ["fine"], "temprature": 0.5}, "temprature",
     "Extra inputs are not permitted"),
    ("/generate", b'{"prompts": ["fine"', None, "Invalid JSON"),
    ("/generate_stream", {"prompts": ["fine"]}, "prompt", "Field required"),
    ("/generate_stream", {"prompt": "fine", "top_p": 0}, "top_p", "greater than 0"),
    ("/generate_stream", {"prompt": "x" * (MAX_CHARS + 1)}, "prompt",
     f"at most {MAX_CHARS} characters"),
])
def test_bad_request_is_a_4xx_naming_the_field(server, route, body, field, message):
    url, _ = server
    resp = post(url, route, body)
    assert 400 <= resp.status_code < 500, resp.text
    assert message in resp.text
    assert field is None or field in resp.text


@pytest.mark.parametrize(("body", "content_type"), [c[1:] for c in HOSTILE_BODIES],
                         ids=[c[0] for c in HOSTILE_BODIES])
def test_hostile_body_is_a_4xx_not_a_500(server, body, content_type):
    url, _ = server
    assert_hostile_body_refused(f"{url}/generate", body.replace(b'"texts"', b'"prompts"'),
                                content_type)


def test_openapi_page_has_a_working_example_for_every_endpoint(server):
    url, _ = server
    assert_every_example_works(url, {"/generate", "/generate_stream", "/metadata",
                                     "/v1/chat/completions", "/v1/completions"}, timeout_s=60)


def test_oversized_body_is_refused_before_it_is_read(server):
    url, _ = server
    head = ("POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {50 * 2**20}\r\n\r\n")
    started = time.monotonic()
    answer = raw_request(url, head, b'{"prompts": ["' + b"x" * 1024)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"over this service's limit" in answer
    assert time.monotonic() - started < 10
    chunked = "POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"%x\r\n%s\r\n" % (4096, b"x" * 4096)
    assert raw_request(url, chunked, chunk * 64).startswith(b"HTTP/1.1 413")
    assert generate(url, {"prompts": ["still serving"], "max_new_tokens": 1})[0]["tokens"] == 1


def test_largest_valid_request_fits_under_the_body_limit(server):
    url, _ = server
    body = json.dumps({"prompts": ["\U0001F600" * MAX_CHARS] * MAX_TEXTS, "max_new_tokens": 1,
                       "temperature": 0.5, "top_p": 0.5})
    assert len(body) > 12 * MAX_CHARS * MAX_TEXTS
    answers = generate(url, body.encode())
    assert [a["tokens"] for a in answers] == [1] * MAX_TEXTS


def test_the_classifier_refuses_a_causal_lm(packaged):
    """Serving a causal LM with bento.service:Classifier would put a random classifier head on it."""
    _, home, info = packaged
    load = ("from bentoml._internal.utils.args import set_arguments; "
            f"set_arguments({{'model': '{info['model_tag']}'}}); import bento.service")
    done = subprocess.run([sys.executable, "-c", load], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "BENTOML_HOME": str(home)}, timeout=120)
    assert done.returncode != 0
    assert "is a causal_lm model: serve it with bento.generate:Generator" in done.stderr


def test_with_truncate_false_a_prompt_over_the_context_is_refused(packaged):
    params, home, _ = packaged
    strict = params.model_copy(update={"serve": params.serve.model_copy(update={"truncate": False})})
    tag = package_tiny(strict, home)["model_tag"]
    with serving("bento.generate:Generator", home, REPO, home.parent / "serve_strict.log",
                 args=("--arg", f"model={tag}")) as url:
        long = post(url, "/generate", {"prompts": ["fine", "x y " * 75], "max_new_tokens": MAX_NEW})
        short = post(url, "/generate", {"prompts": ["fine"], "max_new_tokens": MAX_NEW})
    assert long.status_code == 400, long.text
    assert "prompt 1 has" in long.text and f"leaves {CONTEXT - MAX_NEW}" in long.text
    assert "prompt 0" not in long.text  # only the prompts over the budget are named
    assert short.status_code == 200, short.text


@pytest.mark.slow
def test_with_api_keys_every_endpoint_needs_one(packaged, tmp_path):
    """serve.api_key_env on the causal LM service too (bento/auth.py; the details are tested in
    tests/test_auth.py): a store of its own, so that the module's server keeps its model."""
    params, _, _ = packaged
    keyed = params.model_copy(update={"serve": params.serve.model_copy(
        update={"api_key_env": "LMFORGE_TEST_LM_KEYS"})})
    home = tmp_path / "bentoml"
    tag = package_tiny(keyed, home)["model_tag"]
    key = "lm-key-" + "k" * 24
    auth = {"authorization": f"Bearer {key}"}
    with serving("bento.generate:Generator", home, REPO, tmp_path / "serve_keys.log",
                 args=("--arg", f"model={tag}"), env_vars={"LMFORGE_TEST_LM_KEYS": key}) as url:
        body = {"prompts": ["say hi"], "max_new_tokens": 2}
        refused = [httpx.post(f"{url}{route}", json=sent, timeout=60) for route, sent in [
            ("/generate", body), ("/generate_stream", {"prompt": "say hi"}), ("/metadata", {})]]
        answered = httpx.post(f"{url}/generate", json=body, headers=auth, timeout=60)
        with httpx.stream("POST", f"{url}/generate_stream", json={"prompt": "say hi",
                          "max_new_tokens": 2}, headers=auth, timeout=60) as stream:
            streamed = stream.status_code, "".join(stream.iter_text())
        ready = httpx.get(f"{url}/readyz", timeout=10).status_code
    for resp in refused:
        assert resp.status_code == 401, resp.text
        assert resp.json()["type"] == "authentication_error"
        assert resp.headers["www-authenticate"].startswith("Bearer")
    assert answered.status_code == 200 and answered.json()[0]["tokens"] == 2, answered.text
    assert streamed[0] == 200 and streamed[1]
    assert ready == 200
    assert key not in (tmp_path / "serve_keys.log").read_text()
