"""API keys for the services (bento/service.py, bento/generate.py), from params.serve (in the model's
metadata): ``api_key_env`` names the environment variable holding the keys, ``allow_anonymous``
lets a non-loopback host serve without them.

- ``ApiKeyGuard``: ASGI middleware. With keys, every request needs ``Authorization: Bearer <key>``
  except GET/HEAD of the health and metrics routes and the API description (``PUBLIC``); anything
  else gets 401 with a JSON body and ``WWW-Authenticate: Bearer``. The presented key is compared
  with every configured key by ``hmac.compare_digest`` (constant time, no early exit).
- ``check_startup``: the start-up refusals (the variable unset or empty; a non-loopback host
  without keys), run by each service's ``on_deployment`` hook in `bentoml serve`'s own process,
  before any socket is bound or worker started, so that the command exits with the message. The
  workers repeat it on the address their socket is really bound to (``bound_host``).

Only the variable's NAME travels in the model's metadata. The keys are read from the environment
of the serving process, and neither they nor a presented key are ever logged or stored.
Importing this module loads no model and starts nothing.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import re
import socket
import sys
from collections.abc import Mapping

from bentoml.exceptions import BentoMLException

from bento.limits import is_openai, refuse

logger = logging.getLogger("lmforge.serve.auth")

# Reachable without a key (GET and HEAD only): the probes of a load balancer or Kubernetes, the
# Prometheus scrape, and the API's description (the docs page, its scripts and styles, the OpenAPI
# and BentoML schemas), which tell the routes and their limits but hold no model output or data.
PUBLIC = frozenset({"/livez", "/readyz", "/healthz", "/metrics", "/", "/docs.json", "/schema.json"})
PUBLIC_PREFIXES = ("/static_content/",)
# RFC 6750 b64token: what may follow "Bearer " in the header; a key outside it could never be sent.
TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
REALM = b'Bearer realm="lmforge"'
MISSING_KEY = "missing API key: send it as the header 'Authorization: Bearer <key>'"


class StartupRefused(BentoMLException):
    """The service must not start with these settings: the message says why and what to change.
    A BentoMLException, so that `bentoml serve` prints the message alone (no traceback), exit 1."""


def load_keys(var: str, environ: Mapping[str, str] | None = None) -> tuple[bytes, ...]:
    """The keys in environment variable ``var`` (comma-separated: several for a rotation).
    Refuses an unset or empty variable, and a key that cannot travel in a Bearer header; the
    messages name the variable and the key's position, never a key."""
    environ = os.environ if environ is None else environ
    keys = [k.strip() for k in environ.get(var, "").split(",")]
    keys = [k for k in keys if k]
    if not keys:
        state = "is empty" if var in environ else "is not set"
        raise StartupRefused(
            f"serve.api_key_env names the environment variable {var}, which {state}: set it to the "
            "API key (several: comma-separated), or set serve.api_key_env to null and repackage")
    for i, key in enumerate(keys, 1):
        if not TOKEN.fullmatch(key):
            raise StartupRefused(
                f"key {i} of {len(keys)} in the environment variable {var} holds characters a "
                "Bearer token cannot carry: use letters, digits and - . _ ~ + / (e.g. "
                "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return tuple(k.encode() for k in keys)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 (also as ::ffff:127.x.y.z) and ``localhost``; anything else, 0.0.0.0 and ::
    included, can be reached from other machines."""
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def check_startup(serve: Mapping, host: str,
                  environ: Mapping[str, str] | None = None) -> tuple[bytes, ...] | None:
    """The keys the service must require (None: none), or StartupRefused.

    ``serve``: the model's serve settings (models packaged before api_key_env / allow_anonymous
    existed: no keys, anonymous refused off loopback); ``host``: the address being bound.
    """
    var = serve.get("api_key_env")
    keys = load_keys(var, environ) if var else None
    if keys is None and not is_loopback(host) and not serve.get("allow_anonymous", False):
        raise StartupRefused(
            f"refusing to serve on {host} without API keys: every machine that can reach it could "
            "call the service. Set serve.api_key_env to the name of an environment variable holding "
            "the keys (and set that variable), or serve.allow_anonymous: true to serve without keys "
            "anyway (e.g. behind a proxy that authenticates), then repackage; or bind 127.0.0.1")
    return keys


def deploy_host() -> str:
    """The host `bentoml serve` is about to bind, from an ``on_deployment`` hook.

    BentoML 1.4 calls the hooks from ``_bentoml_impl.server.serving.serve_http`` before it binds,
    and tells them nothing: the host is that function's own ``host`` argument (``--host``,
    ``BENTOML_HOST``, else the service's ``http.host``), read off the call stack. Outside it (or
    should BentoML move it), the configured ``http.host`` with BENTOML_HOST over it.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if (frame.f_code.co_name == "serve_http"
                and frame.f_globals.get("__name__") == "_bentoml_impl.server.serving"
                and frame.f_locals.get("host")):
            return str(frame.f_locals["host"])
        frame = frame.f_back
    from bentoml._internal.configuration.containers import BentoMLContainer

    return os.environ.get("BENTOML_HOST") or str(BentoMLContainer.http.host.get())


def bound_host(argv: list[str] | None = None) -> str | None:
    """The address this worker's listening socket is bound to (BentoML hands a worker its socket
    as ``--fd N``); None outside a BentoML worker."""
    argv = sys.argv if argv is None else argv
    try:
        fd = int(argv[argv.index("--fd") + 1])
        with socket.socket(fileno=os.dup(fd)) as sock:  # a duplicate: closing it keeps the original
            return sock.getsockname()[0]
    except (ValueError, IndexError, OSError):
        return None


def check_worker(serve: Mapping) -> None:
    """In a worker (the service's __init__): check_startup against the socket really bound.

    `bentoml serve` already refused in its own process (check_startup in on_deployment); this
    catches a server started some other way. A refusal here fails the worker at start-up, again at
    every restart, so it never answers a request.
    """
    host = bound_host()
    if host is not None:
        check_startup(serve, host)


def is_public(scope) -> bool:
    path = scope["path"]
    return scope.get("method") in ("GET", "HEAD") and (path in PUBLIC
                                                      or path.startswith(PUBLIC_PREFIXES))


class ApiKeyGuard:
    """ASGI middleware: with keys (``key_env`` names their variable), a request needs
    ``Authorization: Bearer <one of the keys>``, except GET/HEAD of the ``PUBLIC`` routes.
    A refusal is 401 {"error": ..., "type": "authentication_error"} with ``WWW-Authenticate``,
    sent before any of the body is read. ``key_env`` None: every request passes.
    """

    def __init__(self, app, key_env: str | None) -> None:
        self.app = app
        self.keys = load_keys(key_env) if key_env else None  # the worker's environment

    async def __call__(self, scope, receive, send) -> None:
        if self.keys is None or scope["type"] not in ("http", "websocket") or is_public(scope):
            return await self.app(scope, receive, send)
        problem = self.problem(scope)
        if problem is None:
            return await self.app(scope, receive, send)
        error, reason = problem
        client = scope.get("client") or ("?", 0)
        # The method, path, client and what was wrong: never the header's value.
        logger.warning("refused %s %s from %s: %s", scope.get("method", "WEBSOCKET"),
                       scope["path"], client[0], reason)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008, "reason": error})
        challenge = REALM if reason == "no key" else REALM + b', error="invalid_token"'
        return await refuse(send, 401, error, kind="authentication_error",
                            headers=((b"www-authenticate", challenge),), openai=is_openai(scope))

    def problem(self, scope) -> tuple[str, str] | None:
        """None for a valid key, else (the answer's error, the log's reason)."""
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        if header is None:
            return MISSING_KEY, "no key"
        scheme, _, token = header.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return ("the Authorization header must use the Bearer scheme: "
                    "'Authorization: Bearer <key>'", "not a Bearer token")
        if not self.matches(token.strip()):
            return "invalid API key", "wrong key"
        return None

    def matches(self, token: bytes) -> bool:
        """Whether ``token`` is one of the keys, compared with each of them in constant time."""
        found = False
        for key in self.keys:
            found |= hmac.compare_digest(token, key)
        return found
