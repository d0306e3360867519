"""Batched decoding across requests for bento/generate.py: concurrent generations share forward passes.

Without it every request runs ``model.generate`` on its own, and N concurrent requests run N
decoding loops side by side on the same cores, each a forward pass per token. Here one thread
decodes, and a batch of requests moves one token per forward pass:

- ``Engine.stream(ids, sampling)`` queues a request and yields its text as it is generated (a
  ``Delta`` per piece, then one ``Done``); ``Engine.complete`` waits for the whole answer.
- Continuous batching: an idle engine starts a request at once; requests that queue while a batch
  decodes join it between two forward passes (prefilled together, their cache rows left-padded to
  the batch's length or the batch's to theirs), up to ``max_batch_size`` rows, so under load a
  first token waits for one prefill, not for the running batch to end. Models whose cache is not
  a plain per-layer DynamicCache (sliding windows, recurrent state) fall back to static batches:
  requests that queued meanwhile form the next batch.
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
import threading
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


class Batch:
    """The rows decoding together: their jobs, KV cache, attention mask (B, T), last positions (B, 1)
    and the tokens to feed next (B,). Cache length and mask width are equal between passes."""

    def __init__(self, model, jobs: list[Job], pad_id: int) -> None:
        """Prefill: the left-padded prompts in one pass; position ids count real tokens only, so a
        row decodes exactly as it would alone."""
        import torch

        self.model, self.dev = model, next(model.parameters()).device
        # transformers 5 names the KV cache `cache` (`past_key_values` before, deprecated since)
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        rows, mask = left_pad([j.ids for j in jobs], pad_id)
        ids = torch.tensor(rows, device=self.dev)  # (B, T)
        self.mask = torch.tensor(mask, device=self.dev)  # (B, T)
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=self.mask, position_ids=positions, use_cache=True)
        self.cache, self.positions = getattr(out, self.cache_kw), positions[:, -1:]
        self.jobs = list(jobs)
        self.tokens = choose(out.logits[:, -1, :], self.jobs)

    def keep(self, rows: list[int]) -> None:
        """Only ``rows`` go on: finished rows leave with their cache rows."""
        import torch

        if len(rows) == len(self.jobs):
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.dev)
        self.cache.batch_select_indices(index)
        self.mask, self.positions, self.tokens = self.mask[index], self.positions[index], self.tokens[index]
        self.jobs = [self.jobs[i] for i in rows]

    def can_join(self) -> bool:
        """Whether other rows can be merged in: a plain DynamicCache (per layer, keys and values
        (B, heads, T, dim)); sliding-window or recurrent caches cannot."""
        from transformers.cache_utils import DynamicLayer

        layers = getattr(self.cache, "layers", None)
        return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)

    def join(self, other: Batch) -> None:
        """Merge ``other``'s rows in: the shorter side is left-padded (masked) to the longer."""
        import torch

        width = max(self.mask.shape[1], other.mask.shape[1])

        def pad(t, dim: int):  # left-pad dimension ``dim`` of t to ``width`` with zeros
            missing = width - t.shape[dim]
            if not missing:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([pad(mine.keys, -2), pad(theirs.keys, -2)])
            mine.values = torch.cat([pad(mine.values, -2), pad(theirs.values, -2)])
        self.mask = torch.cat([pad(self.mask, 1), pad(other.mask, 1)])
        self.positions = torch.cat([self.positions, other.positions])
        self.tokens = torch.cat([self.tokens, other.tokens])
        self.jobs += other.jobs

    def step(self) -> None:
        """One forward pass: every row's last token in, the next token of every row chosen."""
        import torch

        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.jobs), 1))], dim=1)  # (B, T+1)
        self.positions = self.positions + 1
        out = self.model(input_ids=self.tokens[:, None], attention_mask=self.mask,
                         position_ids=self.positions, use_cache=True, **{self.cache_kw: self.cache})
        self.tokens = choose(out.logits[:, -1, :], self.jobs)


def seed(jobs: list[Job]) -> list[Job]:
    import torch

    for job in jobs:
        if job.sampling.temperature > 0 and job.sampling.seed is not None:
            job.generator = torch.Generator().manual_seed(job.sampling.seed)
    return jobs


def decode_batch(model, jobs: list[Job], pad_id: int, stop_ids: set[int],
                 decode: Callable[[list[int]], str],
                 more: Callable[[int], list[Job]] | None = None, max_rows: int = 0) -> None:
    """Generate every job's answer: one prefill of the left-padded prompts, then one forward pass
    per token for the rows still running. ``more(n)``: up to n requests that queued meanwhile,
    asked for between passes while the batch has fewer than ``max_rows`` rows; they are prefilled
    and join the running batch (continuous batching). Runs in the engine's thread."""
    import torch

    def settle(batch: Batch) -> Batch:
        """Each row takes its newly chosen token; finished rows leave the batch."""
        tokens = batch.tokens.tolist()
        batch.keep([i for i, (job, token) in enumerate(zip(batch.jobs, tokens, strict=True))
                    if not job.cancelled and not job.add(token, decode, stop_ids)])
        return batch

    with torch.inference_mode():
        batch = settle(Batch(model, seed(jobs), pad_id))
        while True:
            room = max_rows - len(batch.jobs)
            new = more(room) if more is not None and room > 0 and batch.can_join() else []
            if new:
                joined = settle(Batch(model, seed(new), pad_id))
                if not batch.jobs:
                    batch = joined
                elif joined.jobs:
                    batch.join(joined)
            if not batch.jobs:
                if new:
                    continue  # every new row finished at once: look for more
                return
            batch.step()
            settle(batch)


class Engine:
    """One decoding thread for a worker's model; requests queue and are decoded in batches.

    ``on_batch(rows)`` is called for every group of requests taken: a new batch, or rows joining
    a running one (metrics).
    """

    def __init__(self, model, tokenizer, stop_ids: set[int], pad_id: int, max_batch_size: int,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.model, self.stop_ids, self.pad_id = model, stop_ids, pad_id
        self.max_batch_size, self.on_batch = max_batch_size, on_batch
        self.decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
        self.queue: list[Job] = []
        self.lock = threading.Lock()  # the queue is filled on the event loop, read by the decoder
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
        with self.lock:
            self.queue.append(job)
        self.wake.set()
        try:
            while True:
                event = await events.get()
                # What queued meanwhile goes out as one piece: a reader that falls behind (a busy
                # event loop, a slow client) gets fewer, larger chunks instead of a backlog.
                while isinstance(event, Delta) and not events.empty():
                    following = events.get_nowait()
                    if not isinstance(following, Delta):
                        yield event
                        event = following
                        break
                    event = Delta(event.text + following.text)
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

    def take(self, n: int) -> list[Job]:
        """Up to n queued requests whose caller is still waiting (from either thread)."""
        with self.lock:
            self.queue = [job for job in self.queue if not job.cancelled]
            jobs, self.queue = self.queue[:n], self.queue[n:]
        return jobs

    def taken(self, n: int) -> list[Job]:
        """take() for the decoding thread: the batch grows by what it takes (metrics)."""
        jobs = self.take(n)
        if jobs and self.on_batch:
            self.on_batch(len(jobs))
        return jobs

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.wake.wait()
            self.wake.clear()  # a request queued from here on sets it again: none is missed
            while jobs := self.taken(self.max_batch_size):
                joined = list(jobs)

                def more(n: int, joined: list[Job] = joined) -> list[Job]:
                    new = self.taken(n)
                    joined.extend(new)
                    return new

                try:
                    await loop.run_in_executor(self.pool, decode_batch, self.model, jobs,
                                               self.pad_id, self.stop_ids, self.decode, more,
                                               self.max_batch_size)
                except Exception as err:  # this batch's requests fail; the engine goes on
                    for job in joined:
                        job.emit(err)
