"""The OpenAI-compatible API of the causal LM service (bento/generate.py mounts it at /v1), so the
``openai`` client, LangChain and curl scripts written for OpenAI work unchanged:

- ``POST /v1/chat/completions``: ``model``, ``messages`` (system / developer / user / assistant;
  content a string or a list of text parts), ``max_tokens`` (or ``max_completion_tokens``),
  ``temperature`` (default 1, as OpenAI's; 0 is greedy), ``top_p``, ``stop`` (a string or up to 4),
  ``seed``, ``stream`` (server-sent events in OpenAI's chunk format, ``data: [DONE]`` last; with
  ``stream_options.include_usage`` a last chunk with the usage), ``n`` (1 only), ``user`` (ignored);
- ``POST /v1/completions``: ``prompt`` (a string, or a list of strings: one choice each; a stream
  takes one), the same options, ``max_tokens`` default 16 as OpenAI's; the prompt is continued as
  raw text (no template);
- ``GET /v1/models``: the one model served.

Every answer has OpenAI's ``usage`` (prompt, completion and total tokens). Every refusal has
OpenAI's error body, ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad request
(the field in ``param``), 404 for another model (code ``model_not_found``) or an unknown route.
The limits are the service's (serve.max_texts messages or prompts of serve.max_chars characters,
max_tokens up to serve.max_new_tokens); a conversation over the context loses its oldest exchanges
(bento/prompts.py) or is refused (serve.truncate false, code ``context_length_exceeded``).

``create_app(backend, ...)``: ``backend()`` gives the object that renders prompts and decodes
(the Generator service instance, or a test's stand-in): ``chat_ids(messages, max_new_tokens)``,
``text_ids(prompt, max_new_tokens)`` (token ids, or bentoml's InvalidArgument) and ``engine``
(bento/decoding.py). Importing this module loads no model.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at run time,
# and the request models are local to create_app.
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from bento.decoding import Delta, Done, Sampling

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}  # ours -> OpenAI's finish_reason


class OpenAIError(Exception):
    """A refusal in OpenAI's error format."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param,
                          "code": self.code}}


def field_of(error: dict) -> str | None:
    """The dotted field of a pydantic error, less "body" and the tags pydantic adds inside a union
    ("constrained-str", "list[TextPart]")."""
    loc = [str(p) for p in error.get("loc", ()) if p != "body" and not set(str(p)) & set("-[]")]
    return ".".join(loc) or None


def validation_error(errors: list[dict]) -> OpenAIError:
    """The first pydantic problem as a 400 naming its field (``messages.1.content``). A value that
    fits no member of a union gets one error per member: a broken limit ("at most 4 items") says
    more than a type the value was never meant to have."""
    param = field_of(errors[0])
    same = [e for e in errors if field_of(e) == param]
    first = next((e for e in same if not e.get("type", "").endswith("_type")), errors[0])
    message = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        return OpenAIError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
    return OpenAIError(400, f"{param}: {message}" if param else message, param)


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def sse(obj: dict | str) -> bytes:
    """One server-sent event."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def create_app(backend: Callable[[], object], model_id: str, max_items: int, max_chars: int,
               max_new_tokens: int):
    """The /v1 FastAPI app; the limits are the service's (see the module docstring)."""
    from bentoml.exceptions import InvalidArgument
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    created = int(time.time())
    Text = Annotated[str, Field(max_length=max_chars)]

    class StreamOptions(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        include_usage: bool = False

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        model: str
        max_tokens: int | None = Field(None, ge=1, le=max_new_tokens)
        max_completion_tokens: int | None = Field(None, ge=1, le=max_new_tokens)
        temperature: float = Field(1.0, ge=0, le=2)
        top_p: float = Field(1.0, gt=0, le=1)
        stop: Text | Annotated[list[Text], Field(max_length=4)] | None = None
        seed: int | None = None
        stream: bool = False
        stream_options: StreamOptions | None = None
        n: Literal[1] = 1
        user: str | None = None

        def sampling(self, default_tokens: int) -> Sampling:
            stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
            tokens = self.max_completion_tokens or self.max_tokens or default_tokens
            return Sampling(tokens, self.temperature, self.top_p, self.seed,
                            tuple(s for s in stops if s))

    class TextPart(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        type: Literal["text"]
        text: Text

    class Message(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        role: Literal["system", "developer", "user", "assistant"]
        content: Text | list[TextPart]
        name: str | None = None

        def canonical(self) -> dict:
            text = self.content if isinstance(self.content, str) else "".join(
                part.text for part in self.content)
            return {"role": "system" if self.role == "developer" else self.role, "content": text}

    class ChatRequest(Options):
        messages: Annotated[list[Message], Field(min_length=1, max_length=max_items)]

    class CompletionRequest(Options):
        prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=max_items)]

        @model_validator(mode="after")
        def _one_prompt_streams(self):
            if self.stream and isinstance(self.prompt, list) and len(self.prompt) > 1:
                raise ValueError("stream: one prompt at a time")
            return self

    app = FastAPI(title="lmforge OpenAI-compatible API", docs_url=None, redoc_url=None,
                  openapi_url=None)

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, err: OpenAIError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, err: RequestValidationError):
        refused = validation_error(err.errors())
        return JSONResponse(refused.body(), status_code=refused.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        refused = OpenAIError(err.status_code, f"{request.method} {request.url.path}: {err.detail}")
        return JSONResponse(refused.body(), status_code=err.status_code)

    def check_model(name: str) -> None:
        if name not in (model_id, model_id.split(":")[0]):
            raise OpenAIError(404, f"The model '{name}' does not exist; this service serves "
                              f"'{model_id.split(':')[0]}'", "model", "model_not_found")

    def prompt_ids(render: Callable[[], list[int]]) -> list[int]:
        try:
            return render()
        except InvalidArgument as err:
            code = "context_length_exceeded" if "serve.truncate" in str(err) else None
            raise OpenAIError(400, str(err), "messages", code) from None

    def example(body: dict) -> dict:
        """openapi_extra: a request example on the docs page (/docs.json), posted as is it works."""
        body = {"model": model_id.split(":")[0], **body, "max_tokens": min(16, max_new_tokens)}
        return {"requestBody": {"content": {"application/json": {"schema": {"example": body}}}}}

    def new_id(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex[:24]}"

    @app.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_id.split(":")[0], "object": "model",
                                            "created": created, "owned_by": "lmforge"}]}

    @app.post("/chat/completions", openapi_extra=example(
        {"messages": [{"role": "user", "content": "Hello!"}], "temperature": 0}))
    async def chat_completions(req: ChatRequest):
        check_model(req.model)
        service = backend()
        sampling = req.sampling(max_new_tokens)
        messages = [m.canonical() for m in req.messages]
        ids = prompt_ids(lambda: service.chat_ids(messages, sampling.max_new_tokens))
        head = {"id": new_id("chatcmpl"), "created": int(time.time()), "model": req.model}
        if req.stream:
            include = bool(req.stream_options and req.stream_options.include_usage)
            events = service.engine.stream(ids, sampling)
            return StreamingResponse(chat_chunks(head, events, include),
                                     media_type="text/event-stream")
        done = await service.engine.complete(ids, sampling)
        message = {"role": "assistant", "content": done.text}
        return {**head, "object": "chat.completion", "system_fingerprint": None,
                "choices": [{"index": 0, "message": message, "logprobs": None,
                             "finish_reason": FINISH[done.finish_reason]}],
                "usage": usage(done.prompt_tokens, done.tokens)}

    @app.post("/completions", openapi_extra=example({"prompt": "Once upon a time", "temperature": 0}))
    async def completions(req: CompletionRequest):
        import asyncio

        check_model(req.model)
        service = backend()
        sampling = req.sampling(min(16, max_new_tokens))  # OpenAI's default for completions
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        rows = [prompt_ids(lambda p=p: service.text_ids(p, sampling.max_new_tokens)) for p in prompts]
        head = {"id": new_id("cmpl"), "created": int(time.time()), "model": req.model}
        if req.stream:
            include = bool(req.stream_options and req.stream_options.include_usage)
            events = service.engine.stream(rows[0], sampling)
            return StreamingResponse(text_chunks(head, events, include),
                                     media_type="text/event-stream")
        answers = await asyncio.gather(*(service.engine.complete(r, sampling) for r in rows))
        return {**head, "object": "text_completion", "system_fingerprint": None,
                "choices": [{"index": i, "text": a.text, "logprobs": None,
                             "finish_reason": FINISH[a.finish_reason]}
                            for i, a in enumerate(answers)],
                "usage": usage(sum(a.prompt_tokens for a in answers),
                               sum(a.tokens for a in answers))}

    return app


def openai_examples(model_id: str, text: str) -> dict[str, dict]:
    """The 200 examples of the /v1 routes in the API description (bento/apidocs.py): answers in
    OpenAI's format to the request examples, the generated ``text`` illustrative."""
    name, head = model_id.split(":")[0], {"created": 1767225600, "system_fingerprint": None}
    tokens = usage(12, 11)
    return {
        "/v1/models": {"object": "list", "data": [{"id": name, "object": "model",
                                                   "created": head["created"], "owned_by": "lmforge"}]},
        "/v1/chat/completions": {
            "id": "chatcmpl-0123456789abcdef01234567", "object": "chat.completion", "model": name,
            **head, "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "logprobs": None, "finish_reason": "stop"}], "usage": tokens},
        "/v1/completions": {
            "id": "cmpl-0123456789abcdef01234567", "object": "text_completion", "model": name,
            **head, "choices": [{"index": 0, "text": text, "logprobs": None,
                                 "finish_reason": "stop"}], "usage": tokens},
    }


async def chat_chunks(head: dict, events: AsyncIterator[Delta | Done],
                      include_usage: bool) -> AsyncIterator[bytes]:
    """chat.completion.chunk events: the role, the content as it comes, the finish reason, the
    usage (when asked for), then [DONE]."""
    head = {**head, "object": "chat.completion.chunk", "system_fingerprint": None}

    def chunk(delta: dict, finish: str | None = None) -> bytes:
        return sse({**head, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish}]})

    yield chunk({"role": "assistant", "content": ""})
    async for event in events:
        if isinstance(event, Delta):
            yield chunk({"content": event.text})
        else:
            yield chunk({}, FINISH[event.finish_reason])
            if include_usage:
                yield sse({**head, "choices": [], "usage": usage(event.prompt_tokens, event.tokens)})
    yield sse("[DONE]")


async def text_chunks(head: dict, events: AsyncIterator[Delta | Done],
                      include_usage: bool) -> AsyncIterator[bytes]:
    """text_completion events for a streamed /v1/completions, then [DONE]."""
    head = {**head, "object": "text_completion", "system_fingerprint": None}
    async for event in events:
        if isinstance(event, Delta):
            yield sse({**head, "choices": [{"index": 0, "text": event.text, "logprobs": None,
                                            "finish_reason": None}]})
        else:
            yield sse({**head, "choices": [{"index": 0, "text": "", "logprobs": None,
                                            "finish_reason": FINISH[event.finish_reason]}]})
            if include_usage:
                yield sse({**head, "choices": [], "usage": usage(event.prompt_tokens, event.tokens)})
    yield sse("[DONE]")
