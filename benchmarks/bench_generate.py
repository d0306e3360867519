"""Benchmark: generation under load, the causal LM service (batched decoding across requests) against
sequential generation and a naive FastAPI app around a transformers pipeline.

    python -m benchmarks.bench_generate                                # ~5 min on 2 quiet cores
    python -m benchmarks.bench_generate --requests 32 --concurrency 1 8 --json /tmp/gen.json
    python -m benchmarks.bench_generate --model-dir models/model       # a trained model instead

The model: by default a GPT-2 built from a config the size of model.scratch's default (4 layers,
hidden 128, context 256) with the chat sample's BPE and the default chat template, random weights
whose EOS is never chosen, so every request generates exactly ``--max-tokens`` tokens and every
system does the same work. The prompts: the chat sample's conversations up to their first user
turn, rendered with the chat template. All decoding is greedy. Measured one system after the other:

(a) sequential: ``model.generate`` in this process, one request after the other (no HTTP);
(b) ``bentoml serve bento.generate:Generator`` (the model packaged into a temporary BentoML store),
    streamed /v1/completions requests at each concurrency;
(c) benchmarks/naive_gen_app.py (FastAPI + a text-generation pipeline, a thread and a streamer per
    request) at the same concurrencies.

Per row: generated tokens per second over the run, time to first token (the first streamed text)
p50 / p95, whole-request latency p50. Prints a markdown table and the ratio of (b) to (c) tokens/s at
concurrency 8 (the issue's target: >= 3). The load client shares the cores with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
from pathlib import Path

from benchmarks.bench_serve import machine
from benchmarks.serve_load import ServeError, percentile, run_benchmark, save_report, serving

REPO = Path(__file__).resolve().parents[1]
CHAT_SAMPLE = REPO / "data" / "sample" / "chat.jsonl"
TARGET_C8 = 3.0
MODEL_NAME = "lmforge-bench-lm"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=64, help="measured requests per run")
    p.add_argument("--warmup", type=int, default=4, help="unmeasured requests before each run")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    p.add_argument("--model-dir", type=Path, help="a causal LM folder (default: the tiny model)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of every system (serve.threads of the service); 1: the tiny "
                   "model gains nothing from more, and OpenMP's spinning threads collapse on busy "
                   "shared cores (one 32-token answer took 0.1 s with 1 thread, 7.6 s with 2)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per request")
    p.add_argument("--json", type=Path, help="also write every figure to this file")
    return p.parse_args(argv)


def build_tiny(folder: Path) -> Path:
    """The default model: model.scratch's default GPT-2 size, the chat sample's BPE and template."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmforge.causal_lm import chat
    from lmforge.causal_lm.data import train_bpe

    conversations = [json.loads(line)["messages"] for line in CHAT_SAMPLE.read_text().splitlines()]
    tokenizer = train_bpe(chat.training_texts(conversations), 1000, 2, specials=(chat.IM_START,))
    chat.ensure_template(tokenizer)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=128, n_layer=4, n_head=4,
                        bos_token_id=eos, eos_token_id=eos, pad_token_id=pad)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # tied output embedding: a zero row is never the argmax of random logits
        model.transformer.wte.weight[[eos, pad]] = 0
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def load_prompts(model_dir: Path, n: int) -> list[str]:
    """Conversations of the chat sample up to their first user turn, as the model reads them."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    rows = [json.loads(line)["messages"] for line in CHAT_SAMPLE.read_text().splitlines()]
    firsts = [m[: next(i for i, x in enumerate(m) if x["role"] == "user") + 1] for m in rows]
    if tokenizer.chat_template:
        return [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
                for m in firsts[:n]]
    return [m[-1]["content"] for m in firsts[:n]]


def context_of(model_dir: Path) -> int:
    config = json.loads((model_dir / "config.json").read_text())
    return next(config[k] for k in ("n_positions", "max_position_embeddings") if k in config)


def package(model_dir: Path, max_tokens: int, threads: int) -> str:
    """The model in the BentoML store of $BENTOML_HOME (set by main), with the metadata
    bento/generate.py reads; its tag."""
    import bentoml

    limits = {"max_texts": 64, "max_chars": 8000, "max_batch_size": 64, "max_latency_ms": 0,
              "max_new_tokens": max(max_tokens, 16), "truncate": True, "workers": 1,
              "timeout_s": 600, "runtime": "torch", "allow_anonymous": False, "threads": threads}
    metadata = {"task": "causal_lm", "format": "chat", "template": "",
                "context": context_of(model_dir), "serve": limits, "runtime": "torch",
                "onnx_file": "", "mlflow_tracking_uri": ""}
    with bentoml.models.create(MODEL_NAME, metadata=metadata) as stored:
        shutil.copytree(model_dir, stored.path, dirs_exist_ok=True)
    return str(stored.tag)


def sequential(model_dir: Path, prompts: list[str], max_tokens: int, threads: int) -> dict:
    """(a): model.generate per request, one after the other; the first token's time from a
    streamer (its first put() is the prompt)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), use_safetensors=True).eval()

    class FirstToken(BaseStreamer):
        def __init__(self) -> None:
            self.puts, self.at = 0, None

        def put(self, value) -> None:
            self.puts += 1
            if self.puts == 2:
                self.at = time.perf_counter()

        def end(self) -> None:
            pass

    ttft, latency, tokens = [], [], 0
    t0 = time.perf_counter()
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        streamer, start = FirstToken(), time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False,
                                 min_new_tokens=max_tokens, pad_token_id=tokenizer.pad_token_id,
                                 streamer=streamer)
        latency.append(time.perf_counter() - start)
        ttft.append(streamer.at - start)
        tokens += out.shape[1] - ids["input_ids"].shape[1]
    return row("sequential (in-process generate)", 1, ttft, latency, tokens,
               time.perf_counter() - t0, {"200": len(prompts)})


def row(system: str, concurrency: int, ttft: list[float], latency: list[float], tokens: int,
        wall: float, statuses: dict) -> dict:
    return {"system": system, "concurrency": concurrency, "requests": len(latency),
            "tokens": tokens, "tokens_s": round(tokens / wall, 1),
            "ttft_p50_ms": round(percentile(ttft, 50) * 1000, 1),
            "ttft_p95_ms": round(percentile(ttft, 95) * 1000, 1),
            "latency_p50_ms": round(percentile(latency, 50) * 1000, 1),
            "wall_s": round(wall, 2), "statuses": statuses}


async def one(session, url: str, body: dict) -> tuple[int | str, float, float, int]:
    """One streamed completion: (status, ttft s, latency s, generated tokens)."""
    start, first, tokens = time.perf_counter(), None, 0
    async with session.post(f"{url}/v1/completions", json=body) as resp:
        if resp.status != 200:
            await resp.read()
            return resp.status, 0.0, time.perf_counter() - start, 0
        async for line in resp.content:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if first is None and event["choices"] and event["choices"][0].get("text"):
                first = time.perf_counter()
            tokens = event.get("usage", {}).get("completion_tokens", tokens) if event.get("usage") else tokens
    end = time.perf_counter()
    return 200, (first or end) - start, end - start, tokens


async def load(url: str, bodies: list[dict], concurrency: int, timeout_s: float) -> tuple[list, float]:
    import aiohttp  # a BentoML dependency; lighter on the shared cores than httpx

    slots = asyncio.Semaphore(concurrency)

    async def bounded(session, body):
        async with slots:
            return await one(session, url, body)

    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                     timeout=timeout) as session:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(bounded(session, b) for b in bodies))
        return results, time.perf_counter() - t0


def served_rows(system: str, url: str, prompts: list[str], args, model: str) -> list[dict]:
    bodies = [{"model": model, "prompt": p, "max_tokens": args.max_tokens, "temperature": 0,
               "stream": True, "stream_options": {"include_usage": True}} for p in prompts]
    if system == "naive":
        bodies = [{"prompt": b["prompt"], "max_tokens": b["max_tokens"]} for b in bodies]
    rows = []
    for c in args.concurrency:
        asyncio.run(load(url, bodies[: args.warmup], c, args.timeout))
        results, wall = asyncio.run(load(url, bodies, c, args.timeout))
        ok = [r for r in results if r[0] == 200]
        statuses = {}
        for r in results:
            statuses[str(r[0])] = statuses.get(str(r[0]), 0) + 1
        rows.append(row(system, c, [r[1] for r in ok], [r[2] for r in ok], sum(r[3] for r in ok),
                        wall, statuses))
        print(f"{system} c={c}: {rows[-1]['tokens_s']} tokens/s, ttft p50 {rows[-1]['ttft_p50_ms']} "
              f"ms, {statuses}", flush=True)
    return rows


def ratio_at_8(rows: list[dict]) -> float | None:
    by = {(r["system"], r["concurrency"]): r["tokens_s"] for r in rows}
    if ("bentoml", 8) in by and by.get(("naive", 8)):
        return by["bentoml", 8] / by["naive", 8]
    return None


def print_report(report: dict) -> None:
    m = report["machine"]
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable); torch {m['torch']}, "
          f"transformers {m['transformers']}, bentoml {m['bentoml']}")
    s = report["settings"]
    print(f"model: {s['model']}; {s['requests']} requests per run, {s['max_tokens']} tokens each, "
          f"greedy; torch threads {s['threads']}\n")
    print("| system | concurrency | requests | tokens/s | TTFT p50 ms | TTFT p95 ms | latency p50 ms "
          "| statuses |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in report["results"]:
        print(f"| {r['system']} | {r['concurrency']} | {r['requests']} | {r['tokens_s']} | "
              f"{r['ttft_p50_ms']} | {r['ttft_p95_ms']} | {r['latency_p50_ms']} | {r['statuses']} |")
    ratio = report["ratio_c8"]
    if ratio is not None:
        verdict = "PASS" if ratio >= TARGET_C8 else "MISS"
        print(f"\nbentoml / naive tokens/s at c=8: {ratio:.2f} (target >= {TARGET_C8}): {verdict}")


def measure(args: argparse.Namespace, work: Path) -> dict:
    model_dir = args.model_dir or build_tiny(work / "model")
    if not (model_dir / "config.json").exists():
        raise ServeError(f"--model-dir {model_dir} holds no model (no config.json)")
    prompts = load_prompts(model_dir, args.requests)
    os.environ["BENTOML_HOME"] = str(work / "bentoml")  # before bentoml reads its configuration
    tag = package(model_dir, args.max_tokens, args.threads)
    rows = [sequential(model_dir, prompts, args.max_tokens, args.threads)]
    print(f"sequential: {rows[0]['tokens_s']} tokens/s", flush=True)
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True"}
    env.pop("BENTOML_HOST", None)
    exe = str(Path(sys.executable).with_name("bentoml"))
    bento = lambda port: [exe, "serve", "bento.generate:Generator", "--arg", f"model={tag}",  # noqa: E731
                          "--port", str(port), "--host", "127.0.0.1"]
    with serving(bento, REPO, work / "bentoml.log", "/readyz", env) as server:
        rows += served_rows("bentoml", server.url, prompts, args, MODEL_NAME)
    naive = lambda port: [sys.executable, "-m", "benchmarks.naive_gen_app",  # noqa: E731
                          "--model", str(model_dir), "--port", str(port),
                          "--threads", str(args.threads)]
    with serving(naive, REPO, work / "naive.log", "/openapi.json", env) as server:
        rows += served_rows("naive", server.url, prompts, args, MODEL_NAME)
    settings = {"requests": args.requests, "warmup": args.warmup, "concurrency": args.concurrency,
                "max_tokens": args.max_tokens, "threads": args.threads,
                "model": str(args.model_dir) if args.model_dir else
                "tiny GPT-2 from a config (4 layers, hidden 128, vocab 1000), random weights"}
    return {"machine": machine(), "settings": settings, "results": rows, "ratio_c8": ratio_at_8(rows)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report, work = run_benchmark(measure, args, "bench_generate_")
    print_report(report)
    print(f"\nserver logs: {work}")
    save_report(report, args.json)


if __name__ == "__main__":
    main()
