"""Soak: the BentoML service under a steady mix of good and malformed requests (issue 6: zero 5xx).

    python -m benchmarks.soak_serve                                  # 300 s at concurrency 16
    python -m benchmarks.soak_serve --seconds 20 --json /tmp/soak.json

Starts ``bentoml serve bento.service:Classifier --arg model=<tag>`` (as bench_serve.py does), reads the
request limits from POST /metadata, warms up, then for ``--seconds`` keeps ``--concurrency`` requests
in flight: 7 in 10 are good (1-4 SST-2 sentences), the rest cycle through the malformed kinds below.
Reports per kind the statuses seen, the total of 5xx answers, good-request latency, and the resident
memory of the server's process tree after warm-up and at the end. Exits 1 on any 5xx or failed good
request, 2 when it cannot measure.

With API keys (serve.api_key_env of the packaged model, docs/serving.md "API keys"): export the
variable it names for the server, and SOAK_API_KEY=<one of the keys> for the soak, which then sends
``Authorization: Bearer <key>`` with every request and adds two bad kinds, no key and a wrong key
(both should get 401):

    LMFORGE_API_KEYS=k1 SOAK_API_KEY=k1 python -m benchmarks.soak_serve --seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from benchmarks.bench_serve import REPO, bentoml_cmd, load_texts, model_info, server_env
from benchmarks.serve_load import (
    Request,
    Result,
    ServeError,
    drive,
    errors_text,
    latency_ms,
    run_benchmark,
    run_fixed,
    save_report,
    serving,
    status_counts,
    tree_rss_mb,
)

GOOD_SHARE = 7  # in 10
JSON = {"content-type": "application/json"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=300, help="length of the soak, after warm-up")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    p.add_argument("--warmup", type=int, default=64, help="good requests before the soak (not counted)")
    p.add_argument("--tag", help="BentoML model tag; default: model_tag of models/bento.json")
    p.add_argument("--timeout", type=float, default=60, help="seconds per request (client side)")
    p.add_argument("--json", type=Path, help="also write every figure to this file")
    return p.parse_args(argv)


def body(obj: object) -> bytes:
    return json.dumps(obj).encode()


def auth_headers(key: str | None) -> dict[str, str]:
    """The Authorization header for API key ``key`` (SOAK_API_KEY); none without one."""
    return {"authorization": f"Bearer {key}"} if key else {}


def malformed_kinds(limits: dict, body_limit: int, key: str | None = None) -> dict[str, list[Request]]:
    """Each kind of bad request, with a few variants sent in turn; all should get a 4xx. With an
    API key ``key``, each carries it, and two kinds more lack it or carry a wrong one."""
    auth = auth_headers(key)
    max_texts, max_chars = limits["max_texts"], limits["max_chars"]
    huge = b'{"texts": ["' + b"x" * (2 * body_limit) + b'"]}'  # built once: 2x the body limit
    kinds = {
        "malformed_json": [b'{"texts": ["fine"', b"{texts: [fine]}", b"", b"null"],
        "wrong_types": [body({"texts": "a single string"}), body({"texts": ["fine", 3]}),
                        body({"texts": ["fine"], "all_scores": "maybe"}), body({"texts": None}),
                        body(["fine"]), body({"texts": [["nested"]]})],
        "empty_list": [body({"texts": []})],
        "too_many_texts": [body({"texts": ["fine"] * (max_texts + 1)})],
        "too_long_text": [body({"texts": ["fine", "x" * (max_chars + 1)]})],
        "non_utf8": [b'{"texts": ["caf\xe9 \xff\xfe"]}', b'\xff\xfe{\x00"\x00',
                     b'{"texts": ["lone \\ud800 surrogate"]}'],
        "extra_fields": [body({"texts": ["fine"], "all_score": True}), body({"texts": ["fine"], "x": 1})],
        "huge_body": [huge],
    }
    out = {kind: [Request("/classify", c, {**JSON, **auth}, kind) for c in contents]
           for kind, contents in kinds.items()}
    # The service reads a JSON body whatever type it declares (curl -d says form-encoded), so
    # these are bad by their bodies; multipart is refused by its type (415).
    content_types = [("text/plain", b"just some text"),
                     ("application/x-www-form-urlencoded", b"texts=fine"),
                     ("multipart/form-data", body({"texts": ["fine"]})),  # no boundary
                     ("multipart/form-data; boundary=xyz", b"not multipart")]
    out["wrong_content_type"] = [Request("/classify", c, {"content-type": t, **auth},
                                         "wrong_content_type") for t, c in content_types]
    if key:
        good = body({"texts": ["fine"]})
        out["missing_key"] = [Request("/classify", good, JSON, "missing_key"),
                              Request("/metadata", b"{}", JSON, "missing_key")]
        out["wrong_key"] = [Request("/classify", good, {**JSON, **auth_headers(k)}, "wrong_key")
                            for k in ("x" + key, key[:-1] or "x")]
        out["basic_scheme"] = [Request("/classify", good, {**JSON, "authorization": f"Basic {key}"},
                                       "basic_scheme")]
    return out


class Mix:
    """Request i of the soak: good 7 times in 10, else the next malformed kind, until the deadline."""

    def __init__(self, texts: list[str], kinds: dict[str, list[Request]], seconds: float,
                 key: str | None = None) -> None:
        self.texts, self.kinds, self.seconds = texts, list(kinds.values()), seconds
        self.headers = {**JSON, **auth_headers(key)}
        self.rng = random.Random(0)
        self.deadline = float("inf")

    def start(self) -> None:
        self.deadline = time.monotonic() + self.seconds

    def good(self) -> Request:
        n = self.rng.randint(1, 4)
        start = self.rng.randrange(len(self.texts))
        texts = [self.texts[(start + j) % len(self.texts)] for j in range(n)]
        return Request("/classify", body({"texts": texts, "all_scores": self.rng.random() < 0.5}),
                       self.headers)

    def __call__(self, i: int) -> Request | None:
        if time.monotonic() >= self.deadline:
            return None
        if i % 10 < GOOD_SHARE:
            return self.good()
        k = i // 10 * (10 - GOOD_SHARE) + i % 10 - GOOD_SHARE  # how many malformed came before
        variants = self.kinds[k % len(self.kinds)]
        return variants[k // len(self.kinds) % len(variants)]


class MemorySampler(threading.Thread):
    """Resident memory of the server tree every ``every_s`` seconds while the soak runs."""

    def __init__(self, pid: int, every_s: float = 10) -> None:
        super().__init__(daemon=True)
        self.pid, self.every_s, self.samples = pid, every_s, []
        self.done = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.done.wait(self.every_s):
            self.samples.append((round(time.monotonic() - t0, 1), round(tree_rss_mb(self.pid), 1)))


def probe(url: str, kinds: dict[str, list[Request]], timeout_s: float) -> list[dict]:
    """Each bad request once, alone: the exact request and answer of any that is not a 4xx."""
    found = []
    with httpx.Client(base_url=url, timeout=timeout_s) as client:
        for variants in kinds.values():
            for req in variants:
                try:
                    resp = client.request(req.method, req.path, content=req.content, headers=req.headers)
                    status, answer = resp.status_code, resp.text[:300]
                except httpx.HTTPError as err:
                    status, answer = type(err).__name__, str(err)[:300]
                if not (isinstance(status, int) and 400 <= status < 500):
                    shown = {k: "***" if k == "authorization" else v for k, v in req.headers.items()}
                    found.append({"kind": req.kind, "request": f"{req.method} {req.path} {shown} "
                                  f"body {req.content[:120]!r} ({len(req.content)} bytes)",
                                  "status": status, "response": answer})
    return found


def read_limits(url: str, key: str | None = None) -> dict:
    resp = httpx.post(f"{url}/metadata", timeout=30, headers=auth_headers(key))
    if resp.status_code != 200:
        raise ServeError(f"POST /metadata answered {resp.status_code}: {resp.text[:300]}")
    return resp.json()["limits"]


def body_limit_of(limits: dict) -> int:
    from bento.limits import max_body_bytes  # the service's own rule (bento/ of the repo root)

    return max_body_bytes(limits)


def summarize(results: list[Result], wall_s: float) -> dict:
    by_kind: dict[str, list[Result]] = {}
    for r in results:
        by_kind.setdefault(r.kind, []).append(r)
    good = by_kind.get("good", [])
    fives = [r for r in results if isinstance(r.status, int) and r.status >= 500]
    return {
        "wall_s": round(wall_s, 1), "requests": len(results), "req_s": round(len(results) / wall_s, 2),
        "kinds": {kind: {"count": len(rs), "statuses": status_counts(rs)} for kind, rs in by_kind.items()},
        "total_5xx": len(fives),
        "good_failed": sum(r.status != 200 for r in good),
        "good_latency": latency_ms([r.latency_s for r in good if r.status == 200]),
        "malformed_accepted": sum(isinstance(r.status, int) and r.status < 400
                                  for r in results if r.kind != "good"),
        "no_answer": sum(not isinstance(r.status, int) for r in results),  # client saw no response
    }


def soak(args: argparse.Namespace, log: Path) -> dict:
    texts, source = load_texts()
    tag, _, _ = model_info(args.tag)
    key = os.environ.get("SOAK_API_KEY") or None  # the service's key, when it requires one
    with serving(bentoml_cmd(tag), REPO, log, "/readyz", server_env()) as server:
        print(f"bentoml: ready in {server.ready_s:.1f}s; model {tag}; API key "
              f"{'sent' if key else 'none'}", flush=True)
        limits = read_limits(server.url, key)
        kinds = malformed_kinds(limits, body_limit_of(limits), key)
        not_4xx = probe(server.url, kinds, args.timeout)
        mix = Mix(texts, kinds, args.seconds, key)
        # One at a time, then in parallel: both paths of the batcher are warm before memory is read.
        warm = [mix.good() for _ in range(args.warmup)]
        for c in (1, args.concurrency):
            run_fixed(server.url, warm, c, args.timeout)
        rss_warm = tree_rss_mb(server.proc.pid)
        print(f"warm: {rss_warm:.0f} MB; soaking {args.seconds:g}s at concurrency {args.concurrency}",
              flush=True)
        sampler = MemorySampler(server.proc.pid)
        sampler.start()
        mix.start()
        results, wall = asyncio.run(drive(server.url, mix, args.concurrency, args.timeout))
        sampler.done.set()
        rss_end = tree_rss_mb(server.proc.pid)
        after = run_fixed(server.url, [mix.good()], 1, args.timeout)[0][0].status
        alive = server.proc.poll() is None
    report = summarize(results, wall)
    report["memory_mb"] = {"after_warmup": round(rss_warm, 1), "end": round(rss_end, 1),
                           "growth": round(rss_end - rss_warm, 1), "samples": sampler.samples}
    report["probe_not_4xx"] = not_4xx
    report["after_soak"] = {"good_request_status": after, "server_alive": alive,
                            "log_exceptions": log_exceptions(log)}
    report["settings"] = {"seconds": args.seconds, "concurrency": args.concurrency, "tag": tag,
                          "api_key": bool(key),  # whether one was sent, never the key
                          "limits": limits, "texts": source, "log": str(log)}
    return report


def log_exceptions(log: Path, top: int = 6) -> dict[str, int]:
    """The last line of the server log's tracebacks (BentoML logs one per 5xx), most common first."""
    last = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Unavailable)): (.{0,100})")
    counts = Counter(m.group(1) + ": " + m.group(2) for line in log.read_text(errors="replace").splitlines()
                     if (m := last.match(line)))
    return dict(counts.most_common(top))


def print_report(r: dict) -> None:
    s, m = r["settings"], r["memory_mb"]
    print(f"\nsoak: {r['requests']} requests in {r['wall_s']} s ({r['req_s']} req/s) at concurrency "
          f"{s['concurrency']}; limits max_texts {s['limits']['max_texts']}, max_chars "
          f"{s['limits']['max_chars']}\n")
    print("| kind | count | statuses |")
    print("|---|---:|---|")
    for kind, k in r["kinds"].items():
        statuses = ", ".join(f"{status}: {n}" for status, n in k["statuses"].items())
        print(f"| {kind} | {k['count']} | {statuses} |")
    g = r["good_latency"]
    print(f"\ngood requests: p50 {g['p50_ms']} ms, p99 {g['p99_ms']} ms; failed {r['good_failed']} "
          f"({errors_text(r['kinds'].get('good', {}).get('statuses', {}))})")
    print(f"5xx answers: {r['total_5xx']} (goal 0); malformed requests answered < 400: "
          f"{r['malformed_accepted']}; no answer (connection closed, timeout): {r['no_answer']}")
    print(f"server memory (RSS, process tree): {m['after_warmup']} MB after warm-up, {m['end']} MB at "
          f"the end ({m['growth']:+} MB)")
    a = r["after_soak"]
    print(f"after the soak: a good request got {a['good_request_status']}; server alive {a['server_alive']}")
    for found in r["probe_not_4xx"]:
        print(f"bad request not answered 4xx (sent alone): {found['request']} -> {found['status']} "
              f"{found['response']}")
    if a["log_exceptions"]:
        print(f"server log {s['log']}, most common exceptions:")
        for line, n in a["log_exceptions"].items():
            print(f"  {n:6d}  {line}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report, _ = run_benchmark(lambda a, folder: soak(a, folder / "bentoml.log"), args, "soak_serve_")
    print_report(report)
    save_report(report, args.json)
    probe_5xx = [f for f in report["probe_not_4xx"] if isinstance(f["status"], int) and f["status"] >= 500]
    if report["total_5xx"] or probe_5xx or report["good_failed"] \
            or report["after_soak"]["good_request_status"] != 200:
        sys.exit(1)


if __name__ == "__main__":
    main()
