"""Shared HTTP pieces of the services (bento/service.py, bento/generate.py): BentoML's traffic
settings and the request-body limit, both from params.serve (in the model's metadata), the answers
the services refuse with, and how refusals are logged.

Importing this module loads no model and starts nothing, unlike the service modules.
"""

import json
import logging

logger = logging.getLogger("lmforge.serve.limits")

# The bodies of the refusals made by code that is not ours (BentoML's), as it sends them; the API
# description (bento/apidocs.py) shows them as the examples of their statuses.
TOO_MANY_REQUESTS = "Too many requests"  # serve.max_concurrency: BentoML's MaxConcurrencyMiddleware
SERVER_FAULT = "An unexpected error has occurred, please check the server log."
MULTIPART = "this service takes application/json bodies, not multipart forms"


def timed_out(timeout_s: float) -> str:
    """BentoML's 504 error past serve.timeout_s (its TimeoutMiddleware)."""
    return f"Not able to process the request in {timeout_s} seconds"


def over_limit(size: str, max_bytes: int) -> str:
    """Our 413 error: ``size`` is what was seen of the body ("1234 bytes", "over 1234 bytes")."""
    return (f"request body of {size} is over this service's limit of {max_bytes} bytes "
            "(serve.max_texts texts of serve.max_chars characters)")


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
            logger.warning("refused %s %s: 415 multipart body", scope.get("method"), scope["path"])
            return await refuse(send, 415, MULTIPART, openai=is_openai(scope))
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
        logger.warning("refused %s %s: 413 body of %s", scope.get("method"), scope["path"], size)
        await refuse(send, 413, over_limit(size, self.max_bytes), openai=is_openai(scope))


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


# --- logging: a client's mistake is a warning, a fault of ours an error with its traceback --------

def client_status(exc: BaseException | None) -> int | None:
    """The 4xx status BentoML answers ``exc`` with (a pydantic ValidationError: 400; a
    BentoMLException: its error code), or None for a server fault (500)."""
    from bentoml.exceptions import BentoMLException
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return 400
    if isinstance(exc, BentoMLException) and exc.error_code.value < 500:
        return exc.error_code.value
    return None


def one_line(exc: BaseException) -> str:
    """What was wrong, on one line: pydantic's problems as ``field: message``, the first five."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        problems = [f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}"
                    for e in exc.errors(include_url=False)]
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        return "; ".join(problems[:5]) + more
    return " ".join(str(exc).split())


class ClientErrorsAsWarnings(logging.Filter):
    """On BentoML's logger of failed API calls: a refused request (4xx) becomes one WARNING line
    (method, path, status, what was wrong) instead of an ERROR with a traceback; a server fault
    (5xx) stays an ERROR with its traceback.

    BentoML 1.4 (``_bentoml_impl.server.app``, ``api_endpoint_wrapper``) logs every exception of
    an API with ``log_exception``, bad input included: ``ERROR Exception on /classify [POST]`` and
    a traceback through its own request parsing.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        status = client_status(exc)
        if status is not None and record.levelno >= logging.ERROR:
            # BentoML's message is "Exception on %s [%s]" with (path, method).
            two = isinstance(record.args, tuple) and len(record.args) == 2
            path, method = record.args if two else ("?", "?")
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = "refused %s %s: %d %s", (method, path, status, one_line(exc))
            record.exc_info, record.exc_text = None, None
        return True


BENTOML_API_LOGGER = "bentoml._internal.server.http_app"  # where log_exception writes


def log_client_errors_as_warnings() -> None:
    """Install ClientErrorsAsWarnings (once) on BentoML's logger of failed API calls; the services
    call it at import, in each worker, after BentoML configured the server's logging."""
    target = logging.getLogger(BENTOML_API_LOGGER)
    if not any(isinstance(f, ClientErrorsAsWarnings) for f in target.filters):
        target.addFilter(ClientErrorsAsWarnings())
