"""Shared pieces of the serving benchmarks (bench_serve.py, soak_serve.py): no figures of its own.

- ``serving(cmd, ...)``: run a server command in a session of its own on a free 127.0.0.1 port, wait
  until it answers, stop its whole process group on exit (BentoML forks workers);
- ``drive(url, next_request, concurrency)``: a bounded asyncio load driver (closed loop: at most
  ``concurrency`` requests in flight, a new one starts when one ends) that stops by itself when
  ``next_request`` returns None (a fixed count, or a deadline);
- ``percentile`` and ``summarize``: latency figures; ``tree_rss_mb``: resident memory of a server.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

START_TIMEOUT_S = 180  # MiniLM loads in seconds, but two other engineers share the two cores


class ServeError(RuntimeError):
    """The server under test did not start: nothing can be measured."""


def run_benchmark(measure: Callable[[object, Path], dict], args, prefix: str) -> tuple[dict, Path]:
    """``measure(args, folder)`` with a fresh temp folder for the servers' logs: (report, folder).
    A server that would not start (ServeError) ends the program with its message, exit code 2."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        return measure(args, folder), folder
    except ServeError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def save_report(report: dict, path: Path | None) -> None:
    """The report as JSON at ``path`` (the benchmarks' --json), when one is given."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"figures written to {path}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> float:
    """Poll GET ``url`` until 200; the seconds it took. The log tail is in the error otherwise."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if proc.poll() is not None:
            raise ServeError(f"server exited with {proc.returncode} before it was ready; "
                             f"log {log}:\n{log_tail(log)}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise ServeError(f"server not ready after {timeout_s:.0f}s (GET {url}); log {log}:\n{log_tail(log)}")


def stop_process_group(proc: subprocess.Popen, timeout_s: float = 15) -> None:
    """SIGTERM the session the server leads (its workers too), SIGKILL if it lingers."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
    except ProcessLookupError:  # already gone
        proc.wait(timeout=5)


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path
    ready_s: float


@contextmanager
def serving(cmd: Callable[[int], list[str]], cwd: Path, log: Path, ready_path: str,
            env: dict[str, str] | None = None, timeout_s: float = START_TIMEOUT_S) -> Iterator[Server]:
    """Start ``cmd(port)`` on a free port; yield a Server once GET ``ready_path`` is 200; stop it on exit."""
    port = free_port()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        # A session of its own, so one killpg ends the server and every worker it forked.
        proc = subprocess.Popen(cmd(port), cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        yield Server(url, proc, log, wait_ready(url + ready_path, proc, log, timeout_s))
    finally:
        stop_process_group(proc)


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MB.

    RSS counts pages shared between processes (libraries, copy-on-write after fork) once per process:
    an upper bound, but a stable one, which is what a growth figure needs.
    """
    import psutil

    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:  # a worker that exited between listing and reading
            pass
    return total / 2**20


@dataclass(frozen=True)
class Request:
    """One HTTP request to send: ``kind`` groups figures (e.g. "good", "malformed_json")."""

    path: str
    content: bytes
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "application/json"})
    kind: str = "good"
    method: str = "POST"


@dataclass(frozen=True)
class Result:
    kind: str
    status: int | str  # the HTTP status, or the client-side exception's name (no answer came)
    latency_s: float


async def send(client, url: str, req: Request) -> Result:
    import aiohttp

    start = time.perf_counter()
    try:
        async with client.request(req.method, url + req.path, data=req.content,
                                  headers=req.headers) as resp:
            await resp.read()
            status: int | str = resp.status
    except (TimeoutError, aiohttp.ClientError) as err:
        status = type(err).__name__
    return Result(req.kind, status, time.perf_counter() - start)


async def drive(url: str, next_request: Callable[[int], Request | None], concurrency: int,
                timeout_s: float = 60) -> tuple[list[Result], float]:
    """Send ``next_request(0), next_request(1), ...`` keeping at most ``concurrency`` in flight,
    until it returns None; wait for the last answers. Returns (results in start order, wall seconds).
    """
    import aiohttp  # a BentoML dependency

    # aiohttp, not httpx: the client shares the cores, so its CPU time per request is part of
    # every HTTP figure (at c=1 here: ~1 ms per request with aiohttp, ~2.3 ms with httpx).
    slots = asyncio.Semaphore(concurrency)
    tasks: list[asyncio.Task[Result]] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client:
        t0 = time.perf_counter()
        i = 0
        while True:
            await slots.acquire()  # before building the request, so a deadline is checked on time
            req = next_request(i)
            if req is None:
                slots.release()
                break
            task = asyncio.create_task(send(client, url, req))
            task.add_done_callback(lambda _: slots.release())
            tasks.append(task)
            i += 1
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - t0


def run_fixed(url: str, requests: list[Request], concurrency: int,
              timeout_s: float = 60) -> tuple[list[Result], float]:
    """Send exactly ``requests`` at ``concurrency``: (results, wall seconds)."""
    return asyncio.run(drive(url, lambda i: requests[i] if i < len(requests) else None,
                             concurrency, timeout_s))


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between closest ranks (numpy's default); nan if empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def latency_ms(latencies_s: list[float]) -> dict[str, float]:
    return {f"p{q}_ms": round(percentile(latencies_s, q) * 1000, 2) for q in (50, 95, 99)}


def status_counts(results: list[Result]) -> dict[str, int]:
    """How many answers of each status (as strings, JSON keys), most common first."""
    return {str(k): v for k, v in Counter(r.status for r in results).most_common()}


def errors_text(counts: dict[str, int]) -> str:
    """Non-200 statuses as "503: 3, ReadTimeout: 1", or "none"."""
    bad = [f"{status}: {n}" for status, n in counts.items() if status != "200"]
    return ", ".join(bad) or "none"
