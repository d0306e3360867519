"""Batched decoding across requests for bento/generate.py: concurrent generations share forward passes.

Without it every request runs ``model.generate`` on its own, and N concurrent requests run N
decoding loops side by side on the same cores, each a forward pass per token. Here one thread
decodes, and a batch of requests moves one token per forward pass:

- ``Engine.stream(ids, sampling)`` queues a request and yields its text as it is generated (a
  ``Delta`` per piece, then one ``Done``); ``Engine.complete`` waits for the whole answer.
- Static batches that form while the model is busy (as bento/batching.py for the classifier):
  when a batch ends, the next takes every request that queued meanwhile, up to
  ``max_batch_size``; an idle engine starts a request at once. A request never joins a batch
  already decoding (that would be continuous batching), so under load its first token waits for
  the running batch to end.
- Each row of a batch keeps its own options: ``max_new_tokens``, ``temperature`` (0: greedy),
  ``top_p``, ``seed`` (its own random generator: the same seed gives the same text whatever the
  batch) and ``stop`` strings. A finished row (a stop id, a stop string, its length, or a caller
  that went away) leaves the batch and its cache rows go, so the others run on without it.
- Prompts are left-padded into one prefill; position ids count real tokens only, so a row decodes
  exactly as it would alone (``decode_batch`` matches ``model.generate`` token for token, greedy).

Importing this module loads nothing heavy; torch is imported where it is used.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from bento.prompts import left_pad


@dataclass(frozen=True)
class Sampling:
    """One request's decoding options."""

    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # sampling only; None: a fresh random draw
    stop: tuple[str, ...] = ()  # the text ends before the first of these


@dataclass(frozen=True)
class Delta:
    text: str  # the next piece of the answer


@dataclass(frozen=True)
class Done:
    text: str  # the whole answer (special tokens and stop string left out)
    tokens: int  # tokens generated, a stopping id included
    finish_reason: str  # "eos" (a stop id), "stop" (a stop string) or "length"
    prompt_tokens: int


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` may not be sent yet: an incomplete UTF-8
    character (decoded as U+FFFD), or the start of a stop string that the next token may finish."""
    keep = len(text) - len(text.rstrip("\ufffd"))
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                keep = max(keep, n)
                break
    return keep


@dataclass
class Job:
    """A request inside the engine: its prompt, options, progress, and where its events go."""

    ids: list[int]
    sampling: Sampling
    emit: Callable[[object], None]  # called from the decoding thread
    generated: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the answer already emitted
    cancelled: bool = False
    generator: object = None  # torch.Generator of a seeded sampled request

    def finish(self, text: str, reason: str) -> None:
        if len(text) > self.sent:
            self.emit(Delta(text[self.sent:]))
        self.emit(Done(text, len(self.generated), reason, len(self.ids)))

    def add(self, token: int, decode: Callable[[list[int]], str], stop_ids: set[int]) -> bool:
        """Take one generated token; emit what can be sent; True when the answer is complete."""
        self.generated.append(token)
        text = decode(self.generated)
        if token in stop_ids:
            self.finish(text, "eos")
            return True
        cut = min((i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.sampling.stop)
                   if i >= 0), default=-1)
        if cut >= 0:
            self.finish(text[:cut], "stop")
            return True
        if len(self.generated) >= self.sampling.max_new_tokens:
            self.finish(text, "length")
            return True
        ready = len(text) - held_back(text, self.sampling.stop)
        if ready > self.sent:
            self.emit(Delta(text[self.sent:ready]))
            self.sent = ready
        return False


def choose(logits, jobs: list[Job]):
    """The next token of each row (logits (B, V)): argmax for greedy rows, else a draw from the
    temperature-scaled distribution cut to its top-p mass, with the row's own generator."""
    import torch

    tokens = logits.argmax(dim=-1)  # (B,)
    for row, job in enumerate(jobs):
        s = job.sampling
        if s.temperature <= 0:
            continue
        probs = torch.softmax(logits[row].float() / s.temperature, dim=-1)  # (V,)
        if s.top_p < 1:
            sorted_p, order = probs.sort(descending=True)
            outside = sorted_p.cumsum(0) - sorted_p >= s.top_p  # the most probable always stays
            probs = probs.index_fill(0, order[outside], 0.0)
        tokens[row] = torch.multinomial(probs, 1, generator=job.generator)[0]
    return tokens


def decode_batch(model, jobs: list[Job], pad_id: int, stop_ids: set[int],
                 decode: Callable[[list[int]], str]) -> None:
    """Generate every job's answer in one batch: one prefill of the left-padded prompts, then one
    forward pass per token for the rows still running. Runs in the engine's thread."""
    import torch

    for job in jobs:
        if job.sampling.temperature > 0 and job.sampling.seed is not None:
            job.generator = torch.Generator().manual_seed(job.sampling.seed)
    # transformers 5 names the KV cache `cache` (`past_key_values` before, deprecated since)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    rows, mask = left_pad([j.ids for j in jobs], pad_id)
    dev = next(model.parameters()).device
    ids = torch.tensor(rows, device=dev)  # (B, T)
    mask = torch.tensor(mask, device=dev)  # (B, T)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # real tokens count from 0, as alone
    live = list(jobs)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        while True:
            cache, logits = getattr(out, cache_kw), out.logits[:, -1, :]  # (B, V)
            tokens = choose(logits, live).tolist()
            keep = [i for i, (job, token) in enumerate(zip(live, tokens, strict=True))
                    if not job.cancelled and not job.add(token, decode, stop_ids)]
            if not keep:
                return
            if len(keep) < len(live):  # finished rows leave the batch with their cache rows
                index = torch.tensor(keep, device=dev)
                cache.batch_select_indices(index)
                mask, positions = mask[index], positions[index]
                tokens = [tokens[i] for i in keep]
                live = [live[i] for i in keep]
            mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)  # (B, T + 1)
            positions = positions[:, -1:] + 1  # (B, 1)
            out = model(input_ids=torch.tensor(tokens, device=dev)[:, None], attention_mask=mask,
                        position_ids=positions, use_cache=True, **{cache_kw: cache})


class Engine:
    """One decoding thread for a worker's model; requests queue and are decoded in batches.

    ``on_batch(rows)`` is called for every batch (metrics).
    """

    def __init__(self, model, tokenizer, stop_ids: set[int], pad_id: int, max_batch_size: int,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.model, self.stop_ids, self.pad_id = model, stop_ids, pad_id
        self.max_batch_size, self.on_batch = max_batch_size, on_batch
        self.decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
        self.queue: list[Job] = []
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="decode")
        self.wake: asyncio.Event | None = None
        self.loop_task: asyncio.Task | None = None

    async def stream(self, ids: list[int], sampling: Sampling) -> AsyncIterator[Delta | Done]:
        """The answer to one prompt (token ids) as it is generated: Delta pieces, then Done."""
        loop = asyncio.get_running_loop()
        task = self.loop_task  # made on the worker's event loop at the first request (and again
        if task is None or task.done() or task.get_loop() is not loop:  # should that loop change)
            self.wake = asyncio.Event()
            self.loop_task = loop.create_task(self.run())
        events: asyncio.Queue = asyncio.Queue()
        job = Job(list(ids), sampling, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        self.queue.append(job)
        self.wake.set()
        try:
            while True:
                event = await events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, Done):
                    return
        finally:
            job.cancelled = True  # the caller went away (or is done): the row leaves its batch

    async def complete(self, ids: list[int], sampling: Sampling) -> Done:
        async for event in self.stream(ids, sampling):
            if isinstance(event, Done):
                return event
        raise RuntimeError("generation ended without an answer")

    def take(self) -> list[Job]:
        """Up to max_batch_size queued requests whose caller is still waiting."""
        self.queue = [job for job in self.queue if not job.cancelled]
        jobs, self.queue = self.queue[: self.max_batch_size], self.queue[self.max_batch_size:]
        return jobs

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.wake.wait()
            jobs = self.take()
            if not self.queue:
                self.wake.clear()
            if not jobs:
                continue
            if self.on_batch:
                self.on_batch(len(jobs))
            try:
                await loop.run_in_executor(self.pool, decode_batch, self.model, jobs, self.pad_id,
                                           self.stop_ids, self.decode)
            except Exception as err:  # this batch's requests fail; the engine goes on
                for job in jobs:
                    job.emit(err)
