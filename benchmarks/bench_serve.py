"""Benchmark: the BentoML service against a raw forward pass and a naive FastAPI app (issue 6 targets).

    python -m benchmarks.bench_serve                                   # ~3-5 min on 2 quiet cores
    python -m benchmarks.bench_serve --requests 20 --concurrency 1 8 --json /tmp/bench.json

One request set (``--texts-per-request`` sentences each, from SST-2 test in ../shared/datasets, else
data/sample/reviews.csv), measured three ways, one after the other (never two systems at once):
(a) raw: tokenizer + forward + softmax in this process, one request's texts per call, no HTTP, in
    blocks alternating with each server's concurrency-1 blocks (the same machine state for both);
(b) ``bentoml serve bento.service:Classifier --arg model=<tag>`` (tag: models/bento.json, store:
    $BENTOML_HOME or ~/bentoml) at each concurrency; (c) benchmarks/naive_app.py (FastAPI + a
    transformers pipeline, one request at a time) at the same concurrencies. Warm-up requests are
excluded. Prints a markdown table and the two targets: bentoml / naive throughput at c=32 >= 1.5,
bentoml c=1 p50 / raw p50 <= 1.3. Exits 0 on a MISS (it measures); non-zero when it cannot measure.
The load client runs on the same cores as the server: docs/benchmarks.md says what that means.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

from benchmarks.serve_load import (
    Request,
    Result,
    ServeError,
    errors_text,
    latency_ms,
    run_benchmark,
    run_fixed,
    save_report,
    serving,
    status_counts,
    tree_rss_mb,
)

REPO = Path(__file__).resolve().parents[1]
SST2_TEST = REPO.parent / "shared" / "datasets" / "sst2" / "test.csv"
SAMPLE = REPO / "data" / "sample" / "reviews.csv"
TARGET_THROUGHPUT, TARGET_LATENCY = 1.5, 1.3
BLOCKS = 10  # concurrency 1: alternating blocks of raw calls and served requests


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # MiniLM on 2 quiet cores: raw ~100 calls/s, naive ~60 req/s, two server starts, warm-ups:
    # 1500 requests per run makes the whole benchmark take ~3-5 min.
    p.add_argument("--requests", type=int, default=1500, help="measured requests per run")
    p.add_argument("--warmup", type=int, default=32, help="unmeasured requests before each run")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--texts-per-request", type=int, default=1)
    p.add_argument("--model-dir", type=Path, default=REPO / "models" / "model",
                   help="model folder for raw and naive (the folder the Bento's model was packaged from)")
    p.add_argument("--tag", help="BentoML model tag; default: model_tag of models/bento.json")
    p.add_argument("--timeout", type=float, default=60, help="seconds per request")
    p.add_argument("--json", type=Path, help="also write every figure to this file")
    return p.parse_args(argv)


def load_texts() -> tuple[list[str], str]:
    source = SST2_TEST if SST2_TEST.exists() else SAMPLE
    with source.open(newline="", encoding="utf-8") as f:
        texts = [row["text"] for row in csv.DictReader(f)]
    if not texts:
        raise ServeError(f"{source} has no rows in its text column")
    return texts, str(source)


def request_texts(texts: list[str], n: int, per_request: int) -> list[list[str]]:
    """``n`` requests of ``per_request`` consecutive texts, wrapping around the corpus."""
    return [[texts[(i * per_request + j) % len(texts)] for j in range(per_request)] for i in range(n)]


def model_info(tag: str | None) -> tuple[str, int, Path]:
    """(model tag, truncation length the service uses, the stored model's folder)."""
    import bentoml

    if tag is None:
        bento_json = REPO / "models" / "bento.json"
        if not bento_json.exists():
            raise ServeError(f"{bento_json} not found: pass --tag or run `dvc repro package`")
        tag = json.loads(bento_json.read_text())["model_tag"]
    try:
        stored = bentoml.models.get(tag)
    except bentoml.exceptions.NotFound as err:
        raise ServeError(f"model {tag} is not in the BentoML store ($BENTOML_HOME): {err}") from err
    return tag, int(stored.info.metadata["max_length"]), Path(stored.path)


def same_weights(model_dir: Path, stored: Path) -> bool:
    """Whether raw/naive load the very weights BentoML serves (else the comparison is off)."""
    from lmforge.common import sha256_of

    a, b = model_dir / "model.safetensors", stored / "model.safetensors"
    return a.exists() and b.exists() and sha256_of(a) == sha256_of(b)


def row(system: str, concurrency: int, results, wall_s: float, per_request: int) -> dict:
    ok = [r.latency_s for r in results if r.status == 200]
    return {"system": system, "concurrency": concurrency, "requests": len(results),
            **latency_ms(ok), "req_s": round(len(ok) / wall_s, 2),
            "texts_s": round(len(ok) * per_request / wall_s, 2), "wall_s": round(wall_s, 2),
            "statuses": status_counts(results)}


def raw_forward(model_dir: Path, max_length: int):
    """(a): what the service's forward pass does for one request, in this process, no HTTP."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, use_safetensors=True).eval()

    def forward(texts: list[str]) -> list[list[float]]:
        batch = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        with torch.inference_mode():
            return model(**batch).logits.softmax(dim=-1).tolist()  # (B, num_labels)

    return forward


def time_raw(forward, batches: list[list[str]]) -> tuple[list[Result], float]:
    """One call per request's texts, each timed: (results, wall seconds)."""
    results, t0 = [], time.perf_counter()
    for texts in batches:
        start = time.perf_counter()
        forward(texts)
        results.append(Result("good", 200, time.perf_counter() - start))
    return results, time.perf_counter() - t0


def side_by_side(url: str, requests: list[Request], batches: list[list[str]], forward,
                 timeout_s: float) -> tuple[list[Result], float, list[Result], float]:
    """Concurrency 1 in BLOCKS alternating blocks of the raw forward pass on the same texts, so
    both see the same machine: on a shared VM the raw p50 alone moved between 9.8 and 12.4 ms
    from one run to the next. (server results, wall, raw results, raw wall)."""
    served, raw, wall, raw_wall = [], [], 0.0, 0.0
    step = -(-len(requests) // BLOCKS)
    for start in range(0, len(requests), step):
        part, took = time_raw(forward, batches[start:start + step])
        raw, raw_wall = raw + part, raw_wall + took
        part, took = run_fixed(url, requests[start:start + step], 1, timeout_s)
        served, wall = served + part, wall + took
    return served, wall, raw, raw_wall


def run_server(system: str, cmd, ready_path: str, batches: list[list[str]], forward, args,
               log_dir: Path) -> list[dict]:
    """Start one server; then per concurrency, in the order given, warm-up requests at that
    concurrency and the measured run (at concurrency 1 side by side with the raw forward pass,
    which gets a row of its own)."""
    bodies = [json.dumps({"texts": b}).encode() for b in batches]
    requests = [Request("/classify", body) for body in bodies]
    warmup = [requests[i % len(requests)] for i in range(args.warmup)]
    rows = []
    with serving(cmd, REPO, log_dir / f"{system}.log", ready_path, server_env()) as server:
        print(f"{system}: ready in {server.ready_s:.1f}s", flush=True)
        for c in args.concurrency:
            warm, _ = run_fixed(server.url, warmup, c, args.timeout)
            if warmup and not any(r.status == 200 for r in warm):
                raise ServeError(f"{system}: no warm-up request succeeded at c={c} "
                                 f"({status_counts(warm)}); log {server.log}")
            if c == 1:
                results, wall, raw, raw_wall = side_by_side(server.url, requests, batches, forward,
                                                            args.timeout)
                rows.append(row(f"raw forward (beside {system})", 1, raw, raw_wall,
                                args.texts_per_request))
            else:
                results, wall = run_fixed(server.url, requests, c, args.timeout)
            rows.append(row(system, c, results, wall, args.texts_per_request)
                        | {"server_rss_mb": round(tree_rss_mb(server.proc.pid), 1)})
            print(f"{system} c={c}: {rows[-1]['req_s']} req/s, p50 {rows[-1]['p50_ms']} ms, "
                  f"errors {errors_text(rows[-1]['statuses'])}", flush=True)
    return rows


def server_env() -> dict[str, str]:
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True"}
    env.pop("BENTOML_HOST", None)  # --host is explicit
    return env


def bentoml_cmd(tag: str):
    exe = str(Path(sys.executable).with_name("bentoml"))
    return lambda port: [exe, "serve", "bento.service:Classifier", "--arg", f"model={tag}",
                         "--port", str(port), "--host", "127.0.0.1"]


def naive_cmd(model_dir: Path):
    return lambda port: [sys.executable, "-m", "benchmarks.naive_app", "--model", str(model_dir),
                         "--port", str(port)]  # serving() runs it from REPO


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")  # Linux; platform.processor() is often empty there
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def machine() -> dict:
    import torch

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            **{pkg: version(pkg) for pkg in ("torch", "transformers", "bentoml", "fastapi", "uvicorn")}}


def ratios(rows: list[dict]) -> dict:
    """The two issue targets, from the rows; None where a needed run is missing."""
    by = {(r["system"], r["concurrency"]): r for r in rows}
    common = [c for (s, c) in by if s == "bentoml" and ("naive", c) in by]
    out = {}
    if common:
        c = 32 if 32 in common else max(common)
        value = by["bentoml", c]["req_s"] / by["naive", c]["req_s"] if by["naive", c]["req_s"] else None
        out["throughput"] = {"concurrency": c, "value": value, "target": f">= {TARGET_THROUGHPUT}",
                             "pass": value is not None and value >= TARGET_THROUGHPUT}
    if ("bentoml", 1) in by:
        value = by["bentoml", 1]["p50_ms"] / by["raw forward (beside bentoml)", 1]["p50_ms"]
        out["latency"] = {"concurrency": 1, "value": value, "target": f"<= {TARGET_LATENCY}",
                          "pass": value <= TARGET_LATENCY}
    return out


def print_report(report: dict) -> None:
    m = report["machine"]
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), torch threads "
          f"{m['torch_threads']}; Python {m['python']}, torch {m['torch']}, transformers "
          f"{m['transformers']}, bentoml {m['bentoml']}, fastapi {m['fastapi']}, uvicorn {m['uvicorn']}")
    s = report["settings"]
    print(f"requests: {s['requests']} per run, {s['texts_per_request']} text(s) each, from {s['texts']}; "
          f"model {s['tag']}\n")
    print("| system | concurrency | requests | p50 ms | p95 ms | p99 ms | req/s | texts/s | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in report["results"]:
        print(f"| {r['system']} | {r['concurrency']} | {r['requests']} | {r['p50_ms']} | {r['p95_ms']} | "
              f"{r['p99_ms']} | {r['req_s']} | {r['texts_s']} | {errors_text(r['statuses'])} |")
    names = {"throughput": "bentoml / naive throughput", "latency": "bentoml p50 / raw forward p50"}
    print()
    for key, t in report["ratios"].items():
        value = "n/a" if t["value"] is None else f"{t['value']:.2f}"
        print(f"{names[key]} at c={t['concurrency']}: {value} (target {t['target']}): "
              f"{'PASS' if t['pass'] else 'MISS'}")


def measure(args: argparse.Namespace, log_dir: Path) -> dict:
    texts, source = load_texts()
    tag, max_length, stored = model_info(args.tag)
    if not (args.model_dir / "config.json").exists():
        raise ServeError(f"--model-dir {args.model_dir} holds no model (no config.json)")
    if not same_weights(args.model_dir, stored):
        print(f"warning: {args.model_dir} holds other weights than {tag}: raw and naive run another model")
    batches = request_texts(texts, args.requests, args.texts_per_request)
    forward = raw_forward(args.model_dir, max_length)
    time_raw(forward, batches[:args.warmup])
    rows = run_server("bentoml", bentoml_cmd(tag), "/readyz", batches, forward, args, log_dir)
    rows += run_server("naive", naive_cmd(args.model_dir), "/openapi.json", batches, forward, args,
                       log_dir)
    settings = {"requests": args.requests, "warmup": args.warmup, "concurrency": args.concurrency,
                "texts_per_request": args.texts_per_request, "texts": source, "tag": tag,
                "model_dir": str(args.model_dir), "max_length": max_length}
    return {"machine": machine(), "settings": settings, "results": rows, "ratios": ratios(rows)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report, log_dir = run_benchmark(measure, args, "bench_serve_")
    print_report(report)
    print(f"\nserver logs: {log_dir}")
    save_report(report, args.json)


if __name__ == "__main__":
    main()
