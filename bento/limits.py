"""Shared HTTP pieces of the services (bento/service.py, bento/generate.py): BentoML's traffic
settings and the request-body limit, both from params.serve (in the model's metadata).

Importing this module loads no model and starts nothing, unlike the service modules.
"""

import json


def traffic(limits: dict) -> dict:
    """BentoML's ``traffic`` settings: the request timeout (504 past it) and, when set, the cap on
    requests in flight (429 past it). Models packaged before these keys existed get the old values.
    """
    settings = {"timeout": limits.get("timeout_s", 60)}
    if limits.get("max_concurrency"):
        settings["max_concurrency"] = limits["max_concurrency"]
    return settings


def max_body_bytes(limits: dict) -> int:
    """The largest body a valid request can have: max_texts texts of max_chars characters, each at
    worst 12 bytes of JSON (an escaped surrogate pair, "\\ud83d\\ude00"), plus keys and whitespace.
    The 4096 spare bytes cover the small options next to the texts (all_scores, max_new_tokens, ...).
    """
    return limits["max_texts"] * (12 * limits["max_chars"] + 64) + 4096


class RequestGuard:
    """ASGI middleware in front of the APIs: a multipart body gets 415 and a body over
    ``max_bytes`` 413, both before anything parses them.

    Multipart: every API takes JSON, but BentoML parses a multipart body as a form first, and a
    malformed one (no boundary) fails inside it with a 500. A declared Content-Length over the
    limit is refused without reading a byte; a body without one (chunked) is read only up to the
    limit. Either way memory stays bounded.
    """

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if headers.get(b"content-type", b"").lower().startswith(b"multipart/"):
            return await refuse(send, 415, "this service takes application/json bodies, not "
                                "multipart forms", openai=is_openai(scope))
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            return await self.refuse(send, f"{declared.decode(errors='replace')} bytes", scope)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return None
            chunks.append(message.get("body", b""))
            size, more = size + len(chunks[-1]), message.get("more_body", False)
            if size > self.max_bytes:
                return await self.refuse(send, f"over {size} bytes", scope)
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def receive_again():
            return replay.pop() if replay else await receive()

        return await self.app(scope, receive_again, send)

    async def refuse(self, send, size: str, scope) -> None:
        await refuse(send, 413, f"request body of {size} is over this service's limit of "
                     f"{self.max_bytes} bytes (serve.max_texts texts of serve.max_chars characters)",
                     openai=is_openai(scope))


def is_openai(scope) -> bool:
    """A request to the OpenAI-compatible routes (bento/openai_api.py), answered in OpenAI's error
    format."""
    return scope.get("path", "").startswith("/v1/")


async def refuse(send, status: int, error: str, kind: str | None = None,
                 headers: tuple[tuple[bytes, bytes], ...] = (), openai: bool = False) -> None:
    """Answer ``status`` with {"error": ...[, "type": kind]} (``openai``: OpenAI's {"error":
    {"message", "type", "param", "code"}}) and close: the rest of the body is never read.
    ``headers``: more response headers (bento/auth.py: WWW-Authenticate)."""
    if openai:
        refusal = {"error": {"message": error, "type": kind or "invalid_request_error",
                             "param": None, "code": None}}
    else:
        refusal = {"error": error, **({"type": kind} if kind else {})}
    body = json.dumps(refusal).encode()
    headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
               (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
