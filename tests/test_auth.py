"""API keys of the services (bento/auth.py): the middleware through an ASGI test client (no server),
the start-up refusals, and a real `bentoml serve` of a tiny classifier packaged with
serve.api_key_env (the causal LM service's check is in tests/test_generate_service.py).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bento import auth
from bento.auth import ApiKeyGuard, StartupRefused, check_startup, is_loopback, load_keys
from bento.limits import RequestGuard
from lmforge.params import parse_params
from tests.conftest import (
    REPO,
    bentoml_home,
    start_process_group,
    stop_process_group,
    tmp_paths,
    write_trained_model,
)
from tests.helpers import free_port, package_tiny, serve_env, serving, write_upstream

httpx = pytest.importorskip("httpx")  # a BentoML dependency

VAR = "LMFORGE_TEST_API_KEYS"
OLD, NEW = "old-key-" + "a" * 24, "new-key-" + "b" * 24  # a rotation: both valid for a while
PUBLIC_ROUTES = ["/livez", "/readyz", "/healthz", "/metrics", "/", "/docs.json", "/schema.json",
                 "/static_content/swagger-ui.css"]


# --- the middleware, through an ASGI client -------------------------------------------------------


def inner_app():
    """Stands in for the service: 200 on every route the real one has (and a few it has not)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def ok(request):
        return JSONResponse({"ok": True, "path": request.url.path})

    routes = [Route(path, ok, methods=["GET", "HEAD", "POST"])
              for path in ["/classify", "/metadata", "/generate", *PUBLIC_ROUTES]]
    return Starlette(routes=routes)


@pytest.fixture
def client(monkeypatch):
    """A test client of ApiKeyGuard in front of inner_app, keys OLD and NEW in VAR."""
    from starlette.testclient import TestClient

    monkeypatch.setenv(VAR, f" {OLD}, {NEW} ")  # spaces around the keys are not part of them
    with TestClient(ApiKeyGuard(inner_app(), key_env=VAR)) as test_client:
        yield test_client


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def assert_refused(resp, error: str) -> None:
    assert resp.status_code == 401, resp.text
    assert resp.headers["content-type"] == "application/json"
    assert resp.json() == {"error": resp.json()["error"], "type": "authentication_error"}
    assert error in resp.json()["error"]
    assert resp.headers["www-authenticate"].startswith("Bearer")


def test_no_key_is_401_with_a_json_body_and_a_bearer_challenge(client):
    resp = client.post("/classify", json={"texts": ["fine"]})
    assert_refused(resp, "missing API key")
    assert "Authorization: Bearer <key>" in resp.json()["error"]


def test_wrong_key_is_401(client):
    resp = client.post("/classify", json={"texts": ["fine"]}, headers=bearer("not-" + NEW))
    assert_refused(resp, "invalid API key")
    assert 'error="invalid_token"' in resp.headers["www-authenticate"]
    # An empty token, or the scheme alone, is a wrong key too.
    for header in ("Bearer ", "Bearer"):
        assert_refused(client.post("/classify", headers={"authorization": header}), "invalid")


def test_right_key_passes(client):
    resp = client.post("/classify", json={"texts": ["fine"]}, headers=bearer(OLD))
    assert resp.status_code == 200, resp.text
    assert resp.json()["path"] == "/classify"


def test_second_key_of_a_rotation_passes_and_the_scheme_is_case_insensitive(client):
    assert client.post("/metadata", headers=bearer(NEW)).status_code == 200
    assert client.post("/metadata", headers={"authorization": f"bearer {NEW}"}).status_code == 200


@pytest.mark.parametrize("route", PUBLIC_ROUTES)
def test_health_metrics_and_docs_need_no_key(client, route):
    assert client.get(route).status_code == 200
    assert client.head(route).status_code == 200
    # Only reading them is public: a POST to the same path needs the key like any other.
    assert client.post(route).status_code == 401


def test_every_other_route_needs_the_key_even_unknown_ones(client):
    for method, route in [("POST", "/generate"), ("GET", "/metadata"), ("GET", "/nope"),
                          ("GET", "/livez/"), ("GET", "/static_content")]:
        assert client.request(method, route).status_code == 401, (method, route)


def test_basic_scheme_is_refused_even_with_a_valid_key(client):
    basic = base64.b64encode(f"user:{OLD}".encode()).decode()
    resp = client.post("/classify", headers={"authorization": f"Basic {basic}"})
    assert_refused(resp, "Bearer scheme")
    resp = client.post("/classify", headers={"authorization": f"Basic {OLD}"})
    assert_refused(resp, "Bearer scheme")


def test_keys_never_reach_the_logs(client, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = "presented-" + secrets.token_urlsafe(16)
    client.post("/classify", headers=bearer(wrong))
    client.post("/classify", headers={"authorization": f"Basic {wrong}"})
    client.post("/classify")
    client.post("/classify", headers=bearer(OLD))
    refusals = [r for r in caplog.records if r.name == "lmforge.serve.auth"]
    assert len(refusals) == 3  # each refusal is logged: method, path, client, what was wrong
    assert "refused POST /classify" in refusals[0].getMessage()
    for secret in (OLD, NEW, wrong):
        assert secret not in caplog.text


def test_keys_are_compared_in_constant_time_with_every_key(monkeypatch):
    """hmac.compare_digest against each configured key, with no early exit on a match."""
    calls = []
    real = auth.hmac.compare_digest

    def recording(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", recording)
    guard = ApiKeyGuard(inner_app(), key_env=None)
    guard.keys = (OLD.encode(), NEW.encode(), b"third-key")
    assert guard.matches(OLD.encode())  # the first key: the other two are still compared
    assert calls == [(OLD.encode(), k) for k in guard.keys]
    calls.clear()
    assert not guard.matches(b"nope")
    assert len(calls) == 3


def test_without_api_key_env_every_request_passes():
    from starlette.testclient import TestClient

    with TestClient(ApiKeyGuard(inner_app(), key_env=None)) as open_client:
        assert open_client.post("/classify").status_code == 200


def test_refusal_comes_before_the_body_is_read(monkeypatch):
    """With RequestGuard inside it (as the services stack them): a caller without a key gets 401
    without one byte of the body read, however large it says it is."""
    monkeypatch.setenv(VAR, NEW)
    app = ApiKeyGuard(RequestGuard(inner_app(), max_bytes=1000), key_env=VAR)
    sent = []

    async def receive():
        raise AssertionError("the body was read")

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/classify", "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(50 * 2**20).encode())]}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 401
    assert (b"connection", b"close") in sent[0]["headers"]


# --- start-up: the key variable, the host --------------------------------------------------------


def test_unset_or_empty_variable_refuses_to_start_naming_it():
    with pytest.raises(StartupRefused, match=f"{VAR}, which is not set"):
        load_keys(VAR, {})
    for empty in ("", " , ,"):
        with pytest.raises(StartupRefused, match=f"{VAR}, which is empty"):
            load_keys(VAR, {VAR: empty})
    with pytest.raises(StartupRefused, match=VAR):
        check_startup({"api_key_env": VAR}, "127.0.0.1", {})


def test_a_key_a_header_cannot_carry_is_refused_without_showing_it():
    with pytest.raises(StartupRefused, match="key 2 of 2") as refused:
        load_keys(VAR, {VAR: f"{OLD},bad key;x"})
    assert "bad key" not in str(refused.value) and OLD not in str(refused.value)


def test_several_keys_for_a_rotation():
    assert load_keys(VAR, {VAR: f"{OLD},{NEW}"}) == (OLD.encode(), NEW.encode())


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.1.1", "::1", "[::1]", "localhost",
                                  "::ffff:127.0.0.1"])
def test_loopback_serves_without_keys_by_default(host):
    assert is_loopback(host)
    assert check_startup({}, host, {}) is None  # a model packaged before the fields existed
    assert check_startup({"allow_anonymous": False}, host, {}) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "192.168.0.7", "fe80::1",
                                  "example.com"])
def test_non_loopback_host_without_keys_refuses_to_start(host):
    assert not is_loopback(host)
    for serve in ({}, {"allow_anonymous": False}):
        with pytest.raises(StartupRefused, match=f"refusing to serve on {host} without API keys"):
            check_startup(serve, host, {})


def test_allow_anonymous_serves_a_non_loopback_host_without_keys():
    assert check_startup({"allow_anonymous": True}, "0.0.0.0", {}) is None


def test_keys_serve_any_host_and_win_over_allow_anonymous():
    env = {VAR: NEW}
    assert check_startup({"api_key_env": VAR}, "0.0.0.0", env) == (NEW.encode(),)
    assert check_startup({"api_key_env": VAR, "allow_anonymous": True}, "::", env) == (NEW.encode(),)
    with pytest.raises(StartupRefused, match=VAR):  # allow_anonymous never excuses a missing key
        check_startup({"api_key_env": VAR, "allow_anonymous": True}, "0.0.0.0", {})


def test_deploy_host_is_serve_https_own_host_argument(monkeypatch):
    """As BentoML calls the on_deployment hooks: from _bentoml_impl.server.serving.serve_http."""
    namespace = {"__name__": "_bentoml_impl.server.serving", "auth": auth}
    exec("def serve_http(host):\n    return auth.deploy_host()\n", namespace)  # noqa: S102
    monkeypatch.setenv("BENTOML_HOST", "10.9.9.9")  # serve_http's argument wins: it is what binds
    assert namespace["serve_http"]("0.0.0.0") == "0.0.0.0"
    # Outside serve_http: BENTOML_HOST, else BentoML's configured http.host.
    assert auth.deploy_host() == "10.9.9.9"
    monkeypatch.delenv("BENTOML_HOST")
    assert auth.deploy_host()


def test_bound_host_reads_the_workers_socket_and_leaves_it_open():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        argv = ["service.py", "svc", "--fd", str(sock.fileno()), "--worker-id", "1"]
        assert auth.bound_host(argv) == "127.0.0.1"
        assert sock.getsockname()[0] == "127.0.0.1"  # still open: only a duplicate was closed
    assert auth.bound_host(["pytest"]) is None


# --- a real `bentoml serve` ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_model_dir):
    """Two tiny classifiers in one fresh store, one with serve.api_key_env = VAR, one without:
    (BentoML home, keyed model tag, open model tag, the keys the keyed server gets)."""
    root = tmp_path_factory.mktemp("auth")
    home = root / "bentoml"
    keys = [secrets.token_urlsafe(24), secrets.token_urlsafe(24)]
    tags = {}
    for name, serve in [("keyed", {"api_key_env": VAR}), ("open", {})]:
        params = parse_params({"paths": tmp_paths(root / name), "prepare": {"max_length": 32},
                               "serve": {"max_texts": 4, "max_chars": 200, **serve}})
        write_trained_model(params.paths.model, tiny_model_dir)
        write_upstream(params)
        # The keys set while packaging, as on a machine that serves too: still never stored.
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(VAR, ",".join(keys))
            tags[name] = package_tiny(params, home)["model_tag"]
    return home, tags["keyed"], tags["open"], keys


def test_packaged_metadata_names_the_variable_and_nothing_stores_a_key(stores):
    import bentoml

    home, keyed, _, keys = stores
    with bentoml_home(home):
        serve = bentoml.models.get(keyed).info.metadata["serve"]
    assert serve["api_key_env"] == VAR and serve["allow_anonymous"] is False
    for path in home.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(k.encode() in data for k in keys), f"a key is stored in {path}"


@pytest.mark.slow
def test_served_classifier_refuses_without_the_key_and_answers_with_it(stores):
    import bentoml
    from bentoml.exceptions import BentoMLException

    home, keyed, _, keys = stores
    log = home.parent / "serve_keyed.log"
    with serving("bento.service:Classifier", home, REPO, log, args=("--arg", f"model={keyed}"),
                 env_vars={VAR: ",".join(keys)}) as url:
        body = {"texts": ["the kettle is great"]}
        resp = httpx.post(f"{url}/classify", json=body, timeout=30)
        assert_refused(resp, "missing API key")
        assert_refused(httpx.post(f"{url}/classify", json=body, headers=bearer("wrong"),
                                  timeout=30), "invalid API key")
        assert httpx.post(f"{url}/metadata", timeout=30).status_code == 401
        for key in keys:  # both keys of the rotation
            resp = httpx.post(f"{url}/classify", json=body, headers=bearer(key), timeout=30)
            assert resp.status_code == 200, resp.text
            assert resp.json()[0]["label"]
        for route in ("/readyz", "/livez", "/metrics", "/docs.json", "/"):
            assert httpx.get(f"{url}{route}", timeout=30).status_code == 200, route
        # BentoML's own client sends its token as the Bearer key (docs/serving.md).
        with bentoml.SyncHTTPClient(url, token=keys[1]) as client:
            assert client.classify(texts=["the kettle is great"])[0]["label"]
        with bentoml.SyncHTTPClient(url) as client, pytest.raises(BentoMLException, match="missing API key"):
            client.classify(texts=["the kettle is great"])
    text = log.read_text()
    assert "refused POST /classify" in text  # the refusals are logged ...
    assert not any(k in text for k in keys)  # ... the keys are not


def serve_until_exit(home: Path, model: str, host: str, log: Path,
                     env_vars: dict[str, str] | None = None, timeout_s: float = 120) -> int:
    """`bentoml serve` that must refuse to start: its exit status. Fails the test if it serves."""
    port = free_port()
    cmd = [str(Path(sys.executable).with_name("bentoml")), "serve", "bento.service:Classifier",
           "--arg", f"model={model}", "--host", host, "--port", str(port)]
    with log.open("w") as out:
        proc = start_process_group(cmd, cwd=REPO, env=serve_env(home, env_vars), stdout=out,
                                   stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None:
            try:
                httpx.get(f"http://127.0.0.1:{port}/livez", timeout=1)
                pytest.fail(f"bentoml serve started on {host}:\n{log.read_text()[-3000:]}")
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"still running:\n{log.read_text()[-3000:]}"
            time.sleep(0.25)
        return proc.returncode
    finally:
        stop_process_group(proc)


@pytest.mark.slow
def test_bentoml_serve_on_all_interfaces_without_keys_exits_with_why(stores):
    home, _, open_model, _ = stores
    log = home.parent / "serve_anonymous.log"
    assert serve_until_exit(home, open_model, "0.0.0.0", log) != 0
    text = log.read_text()
    assert "refusing to serve on 0.0.0.0 without API keys" in text, text[-3000:]
    assert "serve.allow_anonymous" in text


@pytest.mark.slow
def test_bentoml_serve_with_the_key_variable_unset_exits_naming_it(stores):
    home, keyed, _, _ = stores
    log = home.parent / "serve_unset.log"
    assert serve_until_exit(home, keyed, "127.0.0.1", log) != 0
    assert f"{VAR}, which is not set" in log.read_text(), log.read_text()[-3000:]
