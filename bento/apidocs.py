"""The services' API description: the OpenAPI document (GET /docs.json) and the Swagger page that
draws it (GET /), served by the ``ApiDocs`` middleware in place of BentoML's.

What BentoML 1.4 leaves out or gets wrong, and ``describe`` sets right on its document:

- each API's answer is a bare schema, so Swagger shows a made-up one ("string", 0): the service
  gives a real answer as the 200 example;
- the errors listed are BentoML's 400, 404 and 500, with a body ({"error", "detail": string}) that
  is not what is sent, while the statuses the service really returns go unmentioned: every route
  lists each status it can return (400, 401, 404, 413, 415, 429, 500, 504, as its settings make
  possible) with its body's schema and an example of the text sent;
- the /v1 routes (FastAPI, bento/openai_api.py) say 422, but answer 400 in OpenAI's error format;
- a request model gets BentoML's suffix (``ClassifyRequestIODescriptor``) unless it is a
  ``bentoml.IODescriptor`` itself, as the services' are.

BentoML's page loads Google Tag Manager from googletagmanager.com: ``PAGE`` is the same Swagger UI,
from BentoML's own copy (/static_content/), with no third-party script and swagger.io's online
validator off, so the page works offline and calls nothing but this service.

Importing this module loads no model.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from bento.auth import MISSING_KEY
from bento.limits import (
    MULTIPART,
    SERVER_FAULT,
    TOO_MANY_REQUESTS,
    max_body_bytes,
    over_limit,
    timed_out,
)
from bento.openai_api import OpenAIError

REF = "#/components/schemas/{model}"


class Error(BaseModel):
    """A refusal: what is wrong, in a sentence."""

    error: str = Field(description="What is wrong and, where it helps, how to fix it.")
    type: str | None = Field(None, description="401 only: authentication_error.")


class Problem(BaseModel):
    """One problem of a request body (pydantic's error, without the input)."""

    type: str = Field(description="pydantic's error type: missing, too_long, extra_forbidden, ...")
    loc: list[str | int] = Field(description="Where: the field, and the item's index in a list.")
    msg: str
    url: str | None = None


class InvalidRequest(BaseModel):
    """400: the body is not a valid request; every problem is in `detail`."""

    error: str = Field(description="How many problems, and the request's schema name.")
    detail: list[Problem]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error or authentication_error.")
    param: str | None = Field(None, description="The field at fault (messages.1.content).")
    code: str | None = Field(None, description="model_not_found, context_length_exceeded, ...")


class OpenAIErrorBody(BaseModel):
    """OpenAI's error format, on the /v1 routes."""

    error: OpenAIErrorDetail


def schemas(*models: type[BaseModel]) -> dict[str, dict]:
    """OpenAPI components of ``models`` and the models they use, by class name."""
    found: dict[str, dict] = {}
    for model in models:
        schema = model.model_json_schema(ref_template=REF)
        found.update(schema.pop("$defs", {}))
        found[model.__name__] = schema
    return found


def invalid_request(input_spec: type[BaseModel], body: dict) -> dict:
    """The 400 body BentoML sends for ``body`` (api_endpoint_wrapper's, from the same error)."""
    try:
        input_spec.model_validate(body)
    except ValidationError as exc:
        return {"error": f"{exc.error_count()} validation error for {exc.title}",
                "detail": exc.errors(include_context=False, include_input=False)}
    raise ValueError(f"{body} is a valid {input_spec.__name__}: no example of a 400")


def answer(description: str, model: str, example: Any, media: str = "application/json") -> dict:
    return {"description": description,
            "content": {media: {"schema": {"$ref": REF.format(model=model)}, "example": example}}}


def refusals(limits: dict, openai: bool) -> dict[str, dict]:
    """The refusals every API route can get with these serve settings: status -> response.

    ``openai``: a /v1 route, whose refusals of ours (401, 413, 415) are in OpenAI's format; 429
    and 504 come from BentoML's traffic middleware in front of every route, in its format.
    """
    def ours(status: int, message: str, kind: str | None = None) -> tuple[str, dict]:
        if openai:
            return "OpenAIErrorBody", OpenAIError(status, message, kind=kind or
                                                  "invalid_request_error").body()
        return "Error", {"error": message, **({"type": kind} if kind else {})}

    found = {}
    if limits.get("api_key_env"):
        found["401"] = answer("No valid API key: send `Authorization: Bearer <key>`.",
                              *ours(401, MISSING_KEY, "authentication_error"))
    limit = max_body_bytes(limits)
    found["413"] = answer("A body over the largest valid request (serve.max_texts x "
                          "serve.max_chars), refused before it is read.",
                          *ours(413, over_limit(f"{2 * limit} bytes", limit)))
    found["415"] = answer("A multipart body: every API takes application/json.",
                          *ours(415, MULTIPART))
    if limits.get("max_concurrency"):
        found["429"] = answer(f"More than {limits['max_concurrency']} requests in flight "
                              "(serve.max_concurrency): retry later.", "Error",
                              {"error": TOO_MANY_REQUESTS})
    found["504"] = answer(f"Not answered within {limits.get('timeout_s', 60)} s "
                          "(serve.timeout_s).", "Error",
                          {"error": timed_out(limits.get("timeout_s", 60))})
    found["500"] = ({"description": "A fault of the server (its log has the traceback).",
                     "content": {"text/plain": {"example": "Internal Server Error"}}} if openai else
                    answer("A fault of the server; its log has the traceback.", "Error",
                           {"error": SERVER_FAULT}))
    return found


def openai_refusals(route: str) -> dict[str, dict]:
    """The 400 and 404 of a /v1 POST route (bento/openai_api.py), in OpenAI's format."""
    field = "messages" if route.endswith("/chat/completions") else "prompt"
    return {
        "400": answer("The body is not a valid request: the field at fault is in `param`; over "
                      "the context with serve.truncate false: code context_length_exceeded.",
                      "OpenAIErrorBody", OpenAIError(400, f"{field}: Field required", field).body()),
        "404": answer("Another model than the one served (GET /v1/models).", "OpenAIErrorBody",
                      OpenAIError(404, "The model 'gpt-4o' does not exist; this service serves "
                                  "'<model>'", "model", "model_not_found").body()),
    }


def describe(service, limits: dict, examples: dict[str, Any]) -> dict:
    """BentoML's OpenAPI document of ``service``, completed (see the module docstring).

    ``limits``: the model's serve settings; ``examples``: route -> a real 200 answer.
    """
    spec = json.loads(json.dumps(service.openapi_spec.asdict()))  # status keys: strings
    schemas_ = spec["components"]["schemas"]
    for name in ("InvalidArgument", "NotFound", "InternalServerError", "TaskStatusResponse",
                 "HTTPValidationError", "ValidationError"):  # BentoML's and FastAPI's, unused now
        schemas_.pop(name, None)
    openai_routes = any(route.startswith("/v1/") for route in spec["paths"])
    schemas_.update(schemas(Error, InvalidRequest, *([OpenAIErrorBody] if openai_routes else [])))
    apis = {api.route: api for api in service.apis.values()}
    for route, item in spec["paths"].items():
        for method, operation in item.items():
            openai = route.startswith("/v1/")
            if route not in apis and not openai:
                continue  # BentoML's health and metrics routes
            responses = {"200": operation["responses"]["200"]}
            if route in examples:
                [media] = responses["200"]["content"].values()
                media["example"] = examples[route]
            if route in apis:
                api = apis[route]
                request = api.input_spec.model_json_schema().get("example", {})
                responses["400"] = answer(
                    "The body is not a valid request (wrong JSON, type, limit, unknown key; with "
                    "serve.truncate false, a text over the model's length): every problem is in "
                    "`detail`.", "InvalidRequest",
                    invalid_request(api.input_spec, {**request, "unknown_option": True}))
            elif method == "post":
                responses.update(openai_refusals(route))
            refused = refusals(limits, openai)
            if method != "post":  # no body: nothing to parse or to bound
                refused = {k: v for k, v in refused.items() if k not in ("413", "415")}
            operation["responses"] = dict(sorted({**responses, **refused}.items()))
    return json.loads(json.dumps(spec))  # as served: tuples are lists


PAGE = """<!DOCTYPE html>
<html lang="en">
  <head>
    <meta charset="UTF-8">
    <title>{title}</title>
    <link rel="stylesheet" type="text/css" href="./static_content/swagger-ui.css" />
    <link rel="stylesheet" type="text/css" href="./static_content/index.css" />
    <link rel="icon" type="image/png" href="./static_content/favicon-light-32x32.png" sizes="32x32" />
  </head>
  <body>
    <div id="swagger-ui"></div>
    <script src="./static_content/swagger-ui-bundle.js" charset="UTF-8"></script>
    <script src="./static_content/swagger-ui-standalone-preset.js" charset="UTF-8"></script>
    <script>
      window.onload = function () {{
        window.ui = SwaggerUIBundle({{
          url: "./docs.json", dom_id: "#swagger-ui", deepLinking: true, validatorUrl: null,
          presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
          plugins: [SwaggerUIBundle.plugins.DownloadUrl], layout: "StandaloneLayout",
        }});
      }};
    </script>
  </body>
</html>
"""


class ApiDocs:
    """ASGI middleware: answers GET / with ``PAGE`` and GET /docs.json with ``spec()`` (built once,
    on the first call); everything else goes on to the service."""

    def __init__(self, app, spec: Callable[[], dict], title: str) -> None:
        self.app, self.spec = app, functools.cache(spec)
        self.page = PAGE.format(title=title).encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") != "GET" or scope["path"] not in (
                "/", "/docs.json"):
            return await self.app(scope, receive, send)
        if scope["path"] == "/":
            body, kind = self.page, b"text/html; charset=utf-8"
        else:
            body, kind = json.dumps(self.spec()).encode(), b"application/json"
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", kind), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
