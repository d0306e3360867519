"""What a person opens after `dvc repro`, looked at in headless Chromium with the network off.

A tiny repo runs the pipeline up to evaluate; then each page in PAGES is loaded, screenshot into
reports/screens/<name>.png (kept by CI as artifacts), and fails when it is blank, when it asked for
anything beyond this machine, when a script, style or image did not load, or when a script failed.
The pages: `dvc plots show`'s, the validation summary (passed, failed), the Swagger page (`/`) of a
served Bento (`bentoml serve <bento tag>`), and the MLflow run page of the tiny repo's train run
(`mlflow server` on its store). Both servers listen on 127.0.0.1 and are stopped at the end, also
when pytest is killed (tests/conftest.py start_process_group).
More pages: add a Page (the fixture giving its URLs, its URL, the JavaScript that is true once its
content is drawn, the texts it must show).

Chromium is driven over the DevTools protocol on a pipe (--remote-debugging-pipe: no port, no extra
package); a proxy that does not exist (127.0.0.1:9) is where any non-loopback request would go.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from lmforge.params import parse_params
from lmforge.tasks import task
from tests.conftest import (
    REPO,
    make_rows,
    start_process_group,
    stop_process_group,
    tmp_paths,
    write_trained_model,
)
from tests.helpers import (
    dvc,
    dvc_ok,
    free_port,
    package_tiny,
    serving,
    tiny_repo,
    wait_healthy,
    write_upstream,
)

SCREENS = REPO / "reports/screens"
# Debian's package; the names GitHub's Ubuntu runners have it under
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))),
                None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--proxy-server=127.0.0.1:9", "--window-size=1400,1000",
         "--remote-debugging-pipe"]
READY_S = 30  # a page's content drawn (vega renders after load); ~1 s on an idle 2-core machine
LOCAL = ("file", "data", "about", "blob")
LOOPBACK = ("127.0.0.1", "localhost", "[::1]", "::1")


# --- a DevTools client on a pipe ------------------------------------------------------------------

class Chromium:
    """One headless browser; ``visit`` opens a page in a fresh tab and reports what happened."""

    def __init__(self, profile: Path, log: Path):
        self.next_id, self.events, self.buffer = 0, [], b""
        to_chrome, from_chrome = os.pipe(), os.pipe()
        # Chromium reads commands on fd 3 and writes replies on fd 4; high copies cannot collide.
        theirs = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chrome[0], from_chrome[1])]
        for fd in theirs:
            os.set_inheritable(fd, True)
        shell = f'exec "$@" 3<&{theirs[0]} 4>&{theirs[1]} {theirs[0]}<&- {theirs[1]}>&-'
        with log.open("w") as err:
            self.proc = subprocess.Popen(
                ["bash", "-c", shell, "bash", CHROMIUM, *FLAGS, f"--user-data-dir={profile}"],
                stdin=subprocess.DEVNULL, stdout=err, stderr=err, pass_fds=theirs)
        for fd in (*theirs, to_chrome[0], from_chrome[1]):
            os.close(fd)
        self.out, self.inp = to_chrome[1], from_chrome[0]

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout_s: float = READY_S) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        os.write(self.out, json.dumps({**message, **({"sessionId": session} if session else {})}
                                      ).encode() + b"\0")
        reply = self.wait(lambda m: m.get("id") == self.next_id, timeout_s, method)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait(self, match: Callable[[dict], bool], timeout_s: float, what: str) -> dict:
        """The first message that matches; events read on the way are kept in self.events."""
        deadline = time.monotonic() + timeout_s
        while True:
            for i, m in enumerate(self.events):
                if match(m):
                    return self.events.pop(i) if "id" in m else m
            while b"\0" not in self.buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.inp], [], [], left)[0]:
                    raise TimeoutError(f"chromium: no {what} after {timeout_s} s")
                chunk = os.read(self.inp, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium exited ({self.proc.poll()}) waiting for {what}")
                self.buffer += chunk
            raw, self.buffer = self.buffer.split(b"\0", 1)
            self.events.append(json.loads(raw))

    def visit(self, url: str, ready: str, shot: Path, ready_s: float = READY_S,
              height: int | None = None) -> dict:
        """Load ``url``; wait (up to ready_s) until the JS ``ready`` is true; screenshot the whole
        page into ``shot``. ``height``: the window's, for a page that scrolls inside a panel of
        the window's height (the whole page is then no more than the window).

        Returns {"ready", "text", "requests", "failed", "errors"}: every URL asked for, the loads that
        failed or answered >= 400, and the console errors and uncaught exceptions.
        """
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.events.clear()
        for domain in ("Page", "Network", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=session)
        if height:
            self.send("Emulation.setDeviceMetricsOverride", {
                "width": 1400, "height": height, "deviceScaleFactor": 1, "mobile": False}, session)
        self.send("Page.navigate", {"url": url}, session)
        self.wait(lambda m: m.get("method") == "Page.loadEventFired", READY_S, "load event")
        deadline, drawn = time.monotonic() + ready_s, False
        while not drawn and time.monotonic() < deadline:
            drawn = self.evaluate(ready, session) is True
            time.sleep(0.2 if not drawn else 0)
        time.sleep(0.5)  # vega's last canvas pass, late console errors
        size = self.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        png = self.send("Page.captureScreenshot", {"format": "png", "clip": clip,
                                                   "captureBeyondViewport": True}, session)
        shot.write_bytes(base64.b64decode(png["data"]))
        seen = {"ready": drawn, "text": self.evaluate("document.body.innerText", session),
                **self.collected(session)}
        self.send("Target.closeTarget", {"targetId": target})
        return seen

    def evaluate(self, expression: str, session: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                           session)
        return result.get("result", {}).get("value")

    def collected(self, session: str) -> dict:
        mine = [e for e in self.events if e.get("sessionId") == session]
        by_method: dict[str, list[dict]] = {}
        for e in mine:
            by_method.setdefault(e["method"], []).append(e["params"])
        urls = {p["requestId"]: p["request"]["url"] for p in by_method.get("Network.requestWillBeSent", [])}
        failed = [f"{urls.get(p['requestId'], '?')}: {p['errorText']}"
                  for p in by_method.get("Network.loadingFailed", [])]
        failed += [f"{p['response']['url']}: HTTP {p['response']['status']}"
                   for p in by_method.get("Network.responseReceived", []) if p["response"]["status"] >= 400]
        errors = [str(p.get("args", [{}])[0].get("value", p.get("args")))
                  for p in by_method.get("Runtime.consoleAPICalled", []) if p["type"] == "error"]
        errors += [p["exceptionDetails"].get("exception", {}).get("description")
                   or p["exceptionDetails"]["text"] for p in by_method.get("Runtime.exceptionThrown", [])]
        errors += [f"{p['entry']['text']} ({p['entry'].get('url', '')})"
                   for p in by_method.get("Log.entryAdded", []) if p["entry"]["level"] == "error"]
        return {"requests": sorted(set(urls.values())), "failed": failed, "errors": errors}

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout_s=10)
        except (TimeoutError, RuntimeError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.out)
        os.close(self.inp)


# --- the pages ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Page:
    name: str                       # the screenshot: reports/screens/<name>.png
    url: Callable[[dict], str]      # from the dict the fixture named `source` gives
    ready: str                      # JavaScript, true once the content is drawn
    shows: tuple[str, ...]          # texts the page must show
    source: str = "rendered"        # the fixture: the tiny repo's files, or a server's URLs
    height: int | None = None       # the window's height, when not 1000 (Chromium.visit)
    # Requests whose 404 the page expects, by path: the probes of a server's optional features.
    probes: tuple[str, ...] = ()


PLOT_TITLES = ("confusion", "per_class", "plots/train/loss.csv", "plots/train/val.csv")
CHARTS = ("[...document.querySelectorAll('.vega-embed')].filter(e => e.querySelector('svg, canvas')"
          " && e.getBoundingClientRect().height > 100).length")  # drawn charts, whatever renderer
VERDICT_RED = ("getComputedStyle(document.querySelector('tr.failed .verdict')).backgroundColor"
               " == 'rgb(198, 40, 40)'")
# Swagger UI, the classify operation opened (deep link): its request example, the 200 example
# with the model's classes, and the refusals (bento/apidocs.py); then the schema list.
SWAGGER_OPEN = ("document.querySelector('.opblock.is-open .responses-table') !== null && "
                "document.querySelectorAll('.opblock').length >= 2 && "
                "document.querySelector('.models') !== null")
# MLflow's run page: the datasets and the logged model, drawn from its REST answers.
MLFLOW_RUN = ("document.body.innerText.includes('Logged models (1)') && "
              "document.body.innerText.includes('Datasets') && "
              "document.body.innerText.includes('Training')")
PAGES = [
    Page("plots", lambda r: r["plots"].as_uri(), f"{CHARTS} >= {len(PLOT_TITLES)}", PLOT_TITLES),
    Page("validation-passed", lambda r: r["passed"].as_uri(),
         "document.querySelectorAll('tr.passed').length > 20 && !document.querySelector('tr.failed')",
         ("Validation PASSED", "train/text_not_null", "test/no_leakage_from_train", "PASSED")),
    Page("validation-failed", lambda r: r["failed"].as_uri(),
         f"document.querySelectorAll('tr.failed').length == 2 && {VERDICT_RED}",
         ("Validation FAILED: 2 of", "train/min_rows_per_class", "'neutral: rows=", "text_length",
          "FAILED")),
    Page("bento-swagger", lambda s: f"{s['bento']}/#/Service%20APIs/Classifier__classify",
         SWAGGER_OPEN, ("/classify", "/metadata", "ClassifyRequest", "InvalidRequest", "413", "415",
                        "504", "over this service's limit", '"label": "positive"'), "servers"),
    Page("mlflow-run", lambda s: f"{s['mlflow']}/#/experiments/{s['experiment_id']}/runs/"
         f"{s['run_id']}", MLFLOW_RUN, ("Logged models (1)", "Datasets", "train (", "Training",
                                        "Registered models", "git.dirty"), "servers",
         height=2400,
         # The UI asks who is signed in; a server without MLflow's auth app has no such route.
         probes=("/ajax-api/2.0/mlflow/users/current",)),
]


def chromium_or_skip() -> None:
    if CHROMIUM is None:
        if os.environ.get("CI"):  # .ci/run installs it: missing there is a broken setup
            pytest.fail("chromium is not installed (apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")


def broken_rows():
    """The tiny CSV with 3 neutral rows (train's floor is 5) and a text over 5000 characters."""
    rows = make_rows(n_per_class=12, seed=3)
    neutral = rows.index[rows["label"] == "neutral"]
    rows = rows.drop(neutral[3:])
    rows.loc[len(rows) + 100] = {"text": "long " * 1200, "label": "positive"}
    return rows


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, tiny_model_dir) -> dict:
    """A tiny repo run to evaluate, its `dvc plots show` page, and its validation summary when every
    check passed and when two failed (too few neutral rows, a text too long)."""
    chromium_or_skip()
    root = tmp_path_factory.mktemp("browser")
    repo = tiny_repo(root / "repo", tiny_model_dir, max_epochs=2)
    dvc_ok(repo, "repro", "evaluate")
    shown = json.loads(dvc_ok(repo, "plots", "show", "--json"))
    assert shown.get("errors", []) == [], shown["errors"]  # no declared plot is missing
    assert "dvc_plots" in dvc_ok(repo, "plots", "show")  # .dvc/config: the offline template
    passed = root / "validation-passed.html"
    shutil.copy2(repo / "reports/validation/summary.html", passed)

    broken_rows().to_csv(repo / "data/tiny.csv", index=False)
    failed = dvc(repo, "repro", "validate")
    assert failed.returncode != 0
    assert "reports/validation/summary.html" in failed.stderr  # the message points at the page
    return {"repo": repo, "plots": repo / "dvc_plots/index.html", "passed": passed,
            "failed": repo / "reports/validation/summary.html"}


@pytest.fixture(scope="module")
def servers(rendered, tmp_path_factory, tiny_model_dir) -> dict:
    """URLs on 127.0.0.1: a built Bento of a tiny classifier under `bentoml serve` (outside the
    repo, as deployed), and `mlflow server` on the tiny repo's store, with its train run's ids."""
    root = tmp_path_factory.mktemp("servers")
    params = parse_params({"paths": tmp_paths(root), "prepare": {"max_length": 32}})
    write_trained_model(params.paths.model, tiny_model_dir)
    write_upstream(params)
    home = root / "bentoml"
    bento = package_tiny(params, home)["bento_tag"]
    run = json.loads((rendered["repo"] / "models/run.json").read_text())
    with (serving(bento, home, root, root / "bento.log") as bento_url,
          mlflow_ui(rendered["repo"], root / "mlflow.log") as mlflow_url):
        yield {"bento": bento_url, "mlflow": mlflow_url, **run}


@contextmanager
def mlflow_ui(repo: Path, log: Path):
    """`mlflow server` on ``repo``'s store (sqlite:///mlflow.db, the default tracking URI), on a
    free 127.0.0.1 port; stopped, with its workers, at the end."""
    port = free_port()
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
           f"sqlite:///{repo / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    # The job runner (huey processes) serves features the UI page does not need.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with log.open("w") as out:
        proc = start_process_group(cmd, cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(f"{url}/health", proc, log, what="mlflow server")
        yield url
    finally:
        stop_process_group(proc)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium_or_skip()
    root = tmp_path_factory.mktemp("chromium")
    chromium = Chromium(root / "profile", root / "chromium.log")
    yield chromium
    chromium.close()


def colours(png: Path, enough: int = 256) -> int:
    """Distinct colours in a screenshot, up to ``enough`` (a blank page has one)."""
    from PIL import Image

    with Image.open(png) as image:
        found = image.convert("RGB").getcolors(maxcolors=enough)
    return enough if found is None else len(found)  # None: more than `enough`


def is_probe(entry: str, page: Page) -> bool:
    """A failed load or console error that is the 404 of one of the page's expected probes."""
    return "404" in entry and any(re.search(rf"//[^/\s]+{re.escape(path)}[:)]", entry)
                                  for path in page.probes)


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_shows_its_content_offline(page, browser, request):
    SCREENS.mkdir(parents=True, exist_ok=True)
    shot = SCREENS / f"{page.name}.png"
    seen = browser.visit(page.url(request.getfixturevalue(page.source)), page.ready, shot,
                         height=page.height)

    remote = [u for u in seen["requests"] if urlsplit(u).scheme not in LOCAL
              and urlsplit(u).hostname not in LOOPBACK]
    assert remote == [], f"{page.name} asked beyond this machine: {remote}"
    failed = [f for f in seen["failed"] if not is_probe(f, page)]
    assert failed == [], f"{page.name}: did not load: {failed}"
    errors = [e for e in seen["errors"] if not is_probe(e, page)]
    assert errors == [], f"{page.name}: errors: {errors}"
    assert seen["ready"], f"{page.name}: content not drawn within {READY_S} s ({shot})"
    missing = [t for t in page.shows if t not in seen["text"]]
    assert missing == [], f"{page.name} does not show {missing} ({shot})"
    assert colours(shot) > 20, f"{page.name} looks blank: {shot}"


def test_the_pages_cover_the_charts_of_the_default_task():
    """The plots page waits for one canvas per chart: the eval charts are the task's own."""
    stems = {name.removesuffix(".csv") for name in task("classification").plots}
    assert stems <= set(PLOT_TITLES)


@pytest.mark.slow
def test_the_checks_catch_the_page_dvc_writes_without_the_template(rendered, browser, tmp_path):
    """The same plots on DVC's own page (vega from a CDN): blocked, failed and not drawn."""
    from dvc_render import VegaRenderer, render_html

    rows = [{"actual": "a", "predicted": "b"}]
    page = tmp_path / "index.html"
    render_html([VegaRenderer(rows, "confusion", template="confusion", x="actual", y="predicted")],
                page)
    seen = browser.visit(page.as_uri(), f"{CHARTS} >= 1", tmp_path / "cdn.png", ready_s=3)
    assert [urlsplit(u).hostname for u in seen["requests"]].count("cdn.jsdelivr.net") == 3
    assert len(seen["failed"]) == 3 and any("vegaEmbed is not defined" in e for e in seen["errors"])
    assert not seen["ready"]
