"""The OpenAI-compatible API (bento/openai_api.py).

In-process: the /v1 app around a tiny GPT-2 with the default chat template and the real decoding
engine, called by the real `openai` client through httpx's ASGI transport: answers, streamed
chunks, usage and every refusal in OpenAI's error body. Over HTTP (slow): `bentoml serve
bento.generate:Generator` with API keys, called by the `openai` client with its key, plain and
streaming, as a user would.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from bento.decoding import Engine
from bento.openai_api import create_app
from lmforge.causal_lm import chat
from tests.conftest import REPO
from tests.helpers import (
    LM_METRICS,
    lm_params,
    package_tiny,
    raw_request,
    serving,
    tiny_gpt2,
    train_bpe,
    write_trained_lm,
    write_upstream,
)

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

MODEL, CONTEXT, MAX_NEW, MAX_CHARS = "lmforge-lm", 256, 16, 2000
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "say hi"}]


class Backend:
    """What the Generator service gives the /v1 app: prompts as token ids, and its engine."""

    def __init__(self) -> None:
        from bentoml.exceptions import InvalidArgument

        self.refusal = InvalidArgument
        self.tokenizer = train_bpe(["say hi", "the kettle boils", "You are terse."])
        chat.ensure_template(self.tokenizer)
        tok = self.tokenizer
        self.engine = Engine(tiny_gpt2(tok, context=CONTEXT), tok, {tok.eos_token_id},
                             tok.pad_token_id, max_batch_size=8)

    def fitted(self, ids: list[int], max_new_tokens: int) -> list[int]:
        if len(ids) > CONTEXT - max_new_tokens:
            raise self.refusal(f"has {len(ids)} tokens (serve.truncate is false)")
        return ids

    def chat_ids(self, messages: list[dict], max_new_tokens: int) -> list[int]:
        text = chat.render(self.tokenizer, messages, add_generation_prompt=True)
        return self.fitted(self.tokenizer(text, add_special_tokens=False)["input_ids"], max_new_tokens)

    def text_ids(self, prompt: str, max_new_tokens: int) -> list[int]:
        return self.fitted(self.tokenizer(prompt, add_special_tokens=False)["input_ids"],
                           max_new_tokens)


@pytest.fixture(scope="module")
def app():
    """The /v1 app mounted at /v1, as bento/generate.py mounts it."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    backend = Backend()
    api = create_app(lambda: backend, f"{MODEL}:v1", max_items=4, max_chars=MAX_CHARS,
                     max_new_tokens=MAX_NEW)
    return Starlette(routes=[Mount("/v1", app=api)])


def call(app, work):
    """Run ``await work(client)`` with an AsyncOpenAI client talking to ``app`` in-process."""
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="unused",
                                        http_client=http, max_retries=0)
            return await work(client)

    return asyncio.run(go())


def raw(app, method: str, route: str, body=None) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            content = body if isinstance(body, bytes) else None
            return await http.request(method, f"/v1{route}", content=content,
                                      json=None if content is not None else body,
                                      headers={"content-type": "application/json"})

    return asyncio.run(go())


def test_chat_completion_answers_with_usage(app):
    answer = call(app, lambda c: c.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0))
    assert answer.object == "chat.completion" and answer.model == MODEL
    assert answer.id.startswith("chatcmpl-")
    [choice] = answer.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"  # the tiny model never picks EOS in 5 tokens
    assert answer.usage.completion_tokens == 5
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 5
    again = call(app, lambda c: c.chat.completions.create(
        model=f"{MODEL}:v1", messages=MESSAGES, max_tokens=5, temperature=0))
    assert again.choices[0].message.content == choice.message.content  # greedy repeats


def test_streamed_chunks_add_up_to_the_plain_answer(app):
    async def stream(client):
        chunks = await client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True})
        return [c async for c in chunks]

    chunks = call(app, stream)
    plain = call(app, lambda c: c.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finished = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finished == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_the_event_stream_is_openai_sse_ending_with_done(app):
    resp = raw(app, "POST", "/chat/completions", {"model": MODEL, "messages": MESSAGES,
                                                  "max_tokens": 3, "stream": True})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = [e for e in resp.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_stop_seed_and_top_p_are_honoured(app):
    def ask(**options):
        return call(app, lambda c: c.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=MAX_NEW, **options)).choices[0]

    full = ask(temperature=0).message.content
    stopped = ask(temperature=0, stop=[full[4:7], "never appears"])
    assert stopped.message.content == full[: full.find(full[4:7])]
    assert stopped.finish_reason == "stop"
    seeded = ask(temperature=1.0, top_p=0.9, seed=11).message.content
    assert ask(temperature=1.0, top_p=0.9, seed=11).message.content == seeded


def test_completions_continue_each_prompt_and_models_lists_the_model(app):
    answer = call(app, lambda c: c.completions.create(
        model=MODEL, prompt=["the kettle", "say"], max_tokens=4, temperature=0))
    assert answer.object == "text_completion"
    assert [c.index for c in answer.choices] == [0, 1]
    assert answer.usage.completion_tokens == 8
    default = call(app, lambda c: c.completions.create(model=MODEL, prompt="the", temperature=0))
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens
    models = call(app, lambda c: c.models.list())
    assert [m.id for m in models.data] == [MODEL]


@pytest.mark.parametrize(("route", "body", "status", "param", "message"), [
    ("/chat/completions", {"model": MODEL}, 400, "messages", "Field required"),
    ("/chat/completions", {"model": MODEL, "messages": []}, 400, "messages", "at least 1 item"),
    ("/chat/completions", {"model": MODEL, "messages": MESSAGES * 3}, 400, "messages",
     "at most 4 items"),
    ("/chat/completions", {"model": MODEL, "messages": [{"role": "bot", "content": "x"}]}, 400,
     "messages.0.role", "Input should be 'system', 'developer', 'user' or 'assistant'"),
    ("/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400,
     "messages.0.content", "valid string"),
    ("/chat/completions", {"model": MODEL, "messages": [
        {"role": "user", "content": "x" * (MAX_CHARS + 1)}]}, 400, "messages.0.content",
     f"at most {MAX_CHARS} characters"),
    ("/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": MAX_NEW + 1}, 400,
     "max_tokens", f"less than or equal to {MAX_NEW}"),
    ("/chat/completions", {"model": MODEL, "messages": MESSAGES, "temperature": 3}, 400,
     "temperature", "less than or equal to 2"),
    ("/chat/completions", {"model": MODEL, "messages": MESSAGES, "n": 2}, 400, "n", "Input should be 1"),
    ("/chat/completions", {"model": MODEL, "messages": MESSAGES, "stop": ["a"] * 5}, 400, "stop",
     "at most 4 items"),
    ("/chat/completions", {"model": MODEL, "messages": MESSAGES, "tools": []}, 400, "tools",
     "Extra inputs are not permitted"),
    ("/chat/completions", {"model": "gpt-4o", "messages": MESSAGES}, 404, "model",
     "The model 'gpt-4o' does not exist"),
    ("/chat/completions", {"model": MODEL, "messages": [
        {"role": "user", "content": "the kettle boils " * 100}]}, 400, "messages",
     "(serve.truncate is false)"),
    ("/chat/completions", b'{"model": "x", "messages": [', 400, None, "not valid JSON"),
    ("/completions", {"model": MODEL, "prompt": ["a", "b"], "stream": True}, 400, None,
     "stream: one prompt at a time"),
    ("/completions", {"model": MODEL, "prompt": 5}, 400, "prompt", "valid string"),
    ("/embeddings", {"model": MODEL, "input": "x"}, 404, None, "Not Found"),
])
def test_a_bad_request_gets_openai_s_error_body(app, route, body, status, param, message):
    resp = raw(app, "POST", route, body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert message in error["message"]
    assert param is None or error["param"] == param


def test_the_client_raises_openai_s_exceptions(app):
    with pytest.raises(openai.NotFoundError) as missing:
        call(app, lambda c: c.chat.completions.create(model="gpt-4o", messages=MESSAGES))
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as long:
        call(app, lambda c: c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "the kettle boils " * 100}]))
    assert long.value.code == "context_length_exceeded"


# --- over HTTP, with API keys -------------------------------------------------------------------------

KEY = "openai-test-key-" + "k" * 16


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    """A tiny conversation model (default chat template) packaged with serve.api_key_env, served
    by `bentoml serve bento.generate:Generator` with its key set."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("openai")
    params = lm_params(root, pairs=False, data={"chat": {}},
                       serve={"max_texts": 6, "max_chars": MAX_CHARS, "max_new_tokens": MAX_NEW,
                              "api_key_env": "LMFORGE_TEST_OPENAI_KEYS"})
    write_trained_lm(params.paths.model, fmt="chat", context=CONTEXT)
    tokenizer = AutoTokenizer.from_pretrained(str(params.paths.model))
    chat.ensure_template(tokenizer)
    tokenizer.save_pretrained(str(params.paths.model))
    write_upstream(params, LM_METRICS)
    home = root / "bentoml"
    package_tiny(params, home)
    with serving("bento.generate:Generator", home, REPO, root / "serve.log",
                 env_vars={"LMFORGE_TEST_OPENAI_KEYS": KEY}) as url:
        yield url


@pytest.mark.slow
def test_the_openai_client_with_a_key_gets_answers_plain_and_streamed(keyed_server):
    client = openai.OpenAI(base_url=f"{keyed_server}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]
    answer = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6,
                                            temperature=0)
    assert answer.choices[0].message.content and answer.usage.completion_tokens == 6
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6,
                                            temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == answer.choices[0].message.content
    done = client.completions.create(model=MODEL, prompt="the kettle", max_tokens=3, temperature=0)
    assert done.usage.completion_tokens == 3
    # Over the context: the oldest exchange goes, the system message stays, the answer comes.
    history = [MESSAGES[0]] + [{"role": r, "content": "the kettle boils water fast " * 2}
                               for r in ("user", "assistant")] * 2 + [MESSAGES[1]]
    long = client.chat.completions.create(model=MODEL, messages=history, max_tokens=MAX_NEW,
                                          temperature=0)
    assert long.usage.prompt_tokens <= CONTEXT - MAX_NEW
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)


@pytest.mark.slow
def test_without_the_key_every_v1_route_is_refused(keyed_server):
    client = openai.OpenAI(base_url=f"{keyed_server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=MODEL, messages=MESSAGES)
    for method, route in (("POST", "/v1/completions"), ("GET", "/v1/models")):  # no key at all
        resp = httpx.request(method, f"{keyed_server}{route}", json={"model": MODEL, "prompt": "x"},
                             timeout=30)
        assert resp.status_code == 401 and resp.headers["www-authenticate"].startswith("Bearer")
        assert resp.json()["error"]["type"] == "authentication_error"  # OpenAI's error body
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {50 * 2**20}\r\n\r\n")
    answer = raw_request(keyed_server, head, b'{"prompt": "' + b"x" * 1024)
    assert answer.startswith(b"HTTP/1.1 413")
    assert b'{"error": {"message": "request body of' in answer
