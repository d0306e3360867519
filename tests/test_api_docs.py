"""The services' API description (bento/apidocs.py) and how they log refusals (bento/limits.py),
without a server: the service modules are imported in this process against a store holding a tiny
packaged model, the OpenAPI document is built from the service object, and requests go through
BentoML's ASGI app (``Service.to_asgi()``) with a test client.

The served page, in a browser, is tests/test_browser.py's; the served log, tests/test_service.py's.
"""

from __future__ import annotations

import importlib
import logging
import sys

import pytest
from bentoml._internal.configuration.containers import BentoMLContainer

from bento.apidocs import Error, InvalidRequest, OpenAIErrorBody, describe
from lmforge.params import parse_params
from tests.conftest import bentoml_home, tmp_paths, write_trained_model
from tests.helpers import LM_METRICS, lm_params, package_tiny, write_trained_lm, write_upstream

pytest.importorskip("httpx")  # the test client's, a BentoML dependency

VAR, KEY = "LMFORGE_TEST_DOCS_KEYS", "docs-key-" + "d" * 24
SERVE = {"max_texts": 4, "max_chars": 100, "api_key_env": VAR, "max_concurrency": 16,
         "timeout_s": 30}
ALL_STATUSES = {"200", "400", "401", "413", "415", "429", "500", "504"}
BODY_MODELS = {"Error": Error, "InvalidRequest": InvalidRequest, "OpenAIErrorBody": OpenAIErrorBody}


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir):
    """One BentoML store (BentoML has one at a time) holding a tiny classifier and a tiny causal
    LM, both served with API keys and a concurrency cap; their variable set for the keys."""
    root = tmp_path_factory.mktemp("api-docs")
    classifier = parse_params({"paths": tmp_paths(root / "classifier"),
                               "prepare": {"max_length": 32}, "serve": SERVE})
    write_trained_model(classifier.paths.model, tiny_model_dir)
    write_upstream(classifier)
    lm = lm_params(root / "lm", serve={**SERVE, "max_new_tokens": 8})
    write_trained_lm(lm.paths.model)
    write_upstream(lm, LM_METRICS)
    tags = {name: package_tiny(params, root / "bentoml")["model_tag"]
            for name, params in [("bento.service", classifier), ("bento.generate", lm)]}
    with bentoml_home(root / "bentoml"), pytest.MonkeyPatch.context() as mp:
        mp.setenv(VAR, KEY)  # ApiKeyGuard reads the keys when the app is built
        yield tags
    BentoMLContainer.bento_arguments.reset()


def imported(module: str, tags: dict[str, str]):
    """``module`` (bento.service or bento.generate) imported afresh with its model's tag as the
    Bento argument (`--arg model=...`), which it reads at import; dropped again at the end."""
    BentoMLContainer.bento_arguments.set({"model": tags[module]})
    sys.modules.pop(module, None)
    yield importlib.import_module(module)
    sys.modules.pop(module, None)


@pytest.fixture(scope="module")
def classifier(store):
    yield from imported("bento.service", store)


@pytest.fixture(scope="module")
def generator(store):
    yield from imported("bento.generate", store)


@pytest.fixture(scope="module")
def client(classifier):
    """A test client of the classifier's whole ASGI app (middlewares, model loaded)."""
    from starlette.testclient import TestClient

    with TestClient(classifier.Classifier.to_asgi()) as test_client:
        yield test_client


def spec_of(module) -> dict:
    service = getattr(module, "Classifier", None) or module.Generator
    return describe(service, {**module.LIMITS, "timeout_s": SERVE["timeout_s"]},
                    module.answer_examples())


def operations(spec: dict):
    """(route, method, operation) of every API route (BentoML's probes and /metrics left out)."""
    for route, item in spec["paths"].items():
        for method, operation in item.items():
            if route not in ("/healthz", "/livez", "/readyz", "/metrics"):
                yield route, method, operation


def example_of(response: dict):
    [media] = response["content"].values()
    return media["example"]


# --- the OpenAPI document -------------------------------------------------------------------------


def test_schema_names_carry_no_bentoml_suffix(classifier, generator):
    for module, request in [(classifier, "ClassifyRequest"), (generator, "GenerateRequest")]:
        spec = spec_of(module)
        names = set(spec["components"]["schemas"])
        assert request in names and "NoInput" in names
        assert [n for n in names if "IODescriptor" in n] == []
        assert "IODescriptor" not in str(spec)
        # Nor in the 400 a client gets: pydantic's title is the class name.
        bad = example_of(spec["paths"]["/metadata"]["post"]["responses"]["400"])
        assert bad["error"] == "1 validation error for NoInput"


def test_every_route_lists_each_status_it_can_return_with_its_body(classifier, generator):
    for module in (classifier, generator):
        spec = spec_of(module)
        for route, method, operation in operations(spec):
            statuses = set(operation["responses"])
            if route.startswith("/v1/"):  # OpenAI's: 404 for another model; GET: no body
                expected = ALL_STATUSES | {"404"} if method == "post" else {"200", "401", "429",
                                                                            "500", "504"}
            else:
                expected = ALL_STATUSES
            assert statuses == expected, (route, statuses ^ expected)
            assert "422" not in statuses  # FastAPI's default; the /v1 routes answer 400
            for status, response in operation["responses"].items():
                example = example_of(response)
                assert example is not None, (route, status)
                if status == "200" or "schema" not in next(iter(response["content"].values())):
                    continue
                [media] = response["content"].values()
                model = media["schema"]["$ref"].rsplit("/", 1)[1]
                assert model in spec["components"]["schemas"], (route, status, model)
                BODY_MODELS[model].model_validate(example)  # the example fits its schema


def test_answer_examples_are_real_answers(classifier, generator, client):
    spec = spec_of(classifier)
    classify = example_of(spec["paths"]["/classify"]["post"]["responses"]["200"])
    classifier.Classifier.apis["classify"].output_spec.model_validate(classify)
    assert {p["label"] for p in classify} <= set(classifier.INFO["labels"])
    assert "string" not in str(classify)  # not Swagger's made-up one
    metadata = example_of(spec["paths"]["/metadata"]["post"]["responses"]["200"])
    answered = client.post("/metadata", json={}, headers={"authorization": f"Bearer {KEY}"})
    assert answered.status_code == 200 and metadata == answered.json()

    spec = spec_of(generator)
    generate = example_of(spec["paths"]["/generate"]["post"]["responses"]["200"])
    generator.Generator.apis["generate"].output_spec.model_validate(generate)
    chat = example_of(spec["paths"]["/v1/chat/completions"]["post"]["responses"]["200"])
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["content"]
    assert chat["model"] == spec["paths"]["/v1/chat/completions"]["post"]["requestBody"][
        "content"]["application/json"]["schema"]["example"]["model"]


def test_documented_refusals_are_what_the_service_sends(classifier, client):
    """Each refusal we can cause here, sent through the app: its body is the documented example
    (exactly, where the text does not depend on the request) or fits the documented schema."""
    responses = spec_of(classifier)["paths"]["/classify"]["post"]["responses"]
    key = {"authorization": f"Bearer {KEY}"}
    sent = {
        "401": client.post("/classify", json={"texts": ["fine"]}),
        "415": client.post("/classify", content=b"x", headers={**key,
                                                              "content-type": "multipart/form-data"}),
        "413": client.post("/classify", content=b"x" * 10**6, headers={
            **key, "content-type": "application/json"}),
        "400": client.post("/classify", json={"texts": ["fine"], "unknown_option": True},
                           headers=key),
    }
    for status, resp in sent.items():
        assert str(resp.status_code) == status, (status, resp.text)
    assert sent["401"].json() == example_of(responses["401"])
    assert sent["415"].json() == example_of(responses["415"])
    assert sent["400"].json() == example_of(responses["400"])  # the documented bad request
    Error.model_validate(sent["413"].json())
    assert "over this service's limit" in sent["413"].json()["error"]


def test_the_docs_page_loads_nothing_from_elsewhere(client):
    import re

    page = client.get("/")
    assert page.status_code == 200 and "swagger-ui" in page.text
    assert "googletagmanager" not in page.text and "validatorUrl: null" in page.text
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert assets and all(a.startswith("./static_content/") for a in assets), assets
    for asset in assets:
        assert client.get(asset.removeprefix(".")).status_code == 200, asset
    assert client.get("/docs.json").json()["paths"]["/classify"]["post"]["responses"]["413"]


# --- logging --------------------------------------------------------------------------------------


def test_a_client_error_is_one_warning_line_a_server_fault_an_error_with_traceback(
        classifier, client, caplog, monkeypatch):
    key = {"authorization": f"Bearer {KEY}"}
    caplog.set_level(logging.INFO)
    assert client.post("/classify", json={"texts": []}, headers=key).status_code == 400
    [refused] = [r for r in caplog.records if r.name == "bentoml._internal.server.http_app"]
    assert refused.levelno == logging.WARNING and refused.exc_info is None
    message = refused.getMessage()
    assert "\n" not in message
    assert message.startswith("refused POST /classify: 400 texts: List should have at least 1")

    caplog.clear()

    def broken(logits):
        raise RuntimeError("a fault of ours")

    monkeypatch.setattr(classifier, "softmax", broken)  # inside the forward pass
    assert client.post("/classify", json={"texts": ["fine"]}, headers=key).status_code == 500
    [fault] = [r for r in caplog.records if r.name == "bentoml._internal.server.http_app"]
    assert fault.levelno == logging.ERROR
    assert fault.exc_info and "a fault of ours" in str(fault.exc_info[1])
    assert "Traceback" in caplog.text


def test_413_and_415_are_logged_as_one_warning_each(client, caplog):
    caplog.set_level(logging.INFO)
    key = {"authorization": f"Bearer {KEY}"}
    client.post("/classify", content=b"x", headers={**key, "content-type": "multipart/form-data"})
    client.post("/classify", content=b"x" * 10**6, headers={**key,
                                                            "content-type": "application/json"})
    lines = [r.getMessage() for r in caplog.records
             if r.name == "lmforge.serve.limits" and r.levelno == logging.WARNING]
    assert lines == ["refused POST /classify: 415 multipart body",
                     "refused POST /classify: 413 body of 1000000 bytes"]
