"""bento/batching.py: the service's adaptive batcher, on a fake forward pass (no model, no server)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from bento.batching import MAX_PADDING, Batcher, length_chunks


class SlowUpper:
    """A forward pass that takes ``seconds`` and records the batches it saw."""

    def __init__(self, seconds: float = 0.05, fail_on: str | None = None):
        self.seconds, self.fail_on, self.batches = seconds, fail_on, []
        self.threads = set()

    def __call__(self, texts: list[str]) -> list[str]:
        self.batches.append(list(texts))
        self.threads.add(threading.current_thread().name)
        time.sleep(self.seconds)
        if self.fail_on in texts:
            raise ValueError(f"cannot read {self.fail_on}")
        return [t.upper() for t in texts]


def run(coro):
    return asyncio.run(coro)


def test_an_idle_batcher_starts_at_once_and_answers_in_order():
    forward = SlowUpper(seconds=0.0)
    batcher = Batcher(forward, max_batch_size=8)

    async def one():
        started = time.perf_counter()
        answer = await batcher(["a", "b", "c"])
        return answer, time.perf_counter() - started

    answer, took = run(one())
    assert answer == ["A", "B", "C"]
    assert forward.batches == [["a", "b", "c"]]
    assert took < 0.05  # no wait for companions with max_delay 0


def test_concurrent_requests_share_forward_passes_up_to_the_batch_size():
    forward = SlowUpper(seconds=0.05)
    batcher = Batcher(forward, max_batch_size=6, on_batch=lambda r, t: sizes.append((r, t)))
    sizes: list[tuple[int, int]] = []

    async def many():
        return await asyncio.gather(*(batcher([f"r{i}a", f"r{i}b"]) for i in range(10)))

    answers = run(many())
    assert answers == [[f"R{i}A", f"R{i}B"] for i in range(10)]
    # All ten queue before the first pass starts; they go in order, in passes of whole requests
    # of at most 6 texts.
    assert forward.batches[0] == ["r0a", "r0b", "r1a", "r1b", "r2a", "r2b"]
    assert sizes == [(3, 6), (3, 6), (3, 6), (1, 2)]
    assert forward.threads == {"forward_0"}  # one forward pass at a time, off the event loop


def test_a_request_bigger_than_the_batch_size_goes_whole():
    forward = SlowUpper(seconds=0.0)
    batcher = Batcher(forward, max_batch_size=2)
    assert run(batcher(["a", "b", "c"])) == ["A", "B", "C"]  # the forward function splits it


def test_a_failing_pass_fails_its_requests_only_and_the_batcher_goes_on():
    forward = SlowUpper(seconds=0.05, fail_on="bad")
    batcher = Batcher(forward, max_batch_size=1)

    async def mixed():
        return await asyncio.gather(batcher(["ok"]), batcher(["bad"]), batcher(["fine"]),
                                    return_exceptions=True)

    ok, bad, fine = run(mixed())
    assert ok == ["OK"] and fine == ["FINE"]
    assert isinstance(bad, ValueError) and "cannot read bad" in str(bad)


def test_a_request_whose_caller_left_is_never_computed():
    forward = SlowUpper(seconds=0.1)
    batcher = Batcher(forward, max_batch_size=8)

    async def one_gives_up():
        first = asyncio.ensure_future(batcher(["first"]))
        await asyncio.sleep(0.02)  # the first pass is running
        gone = asyncio.ensure_future(batcher(["gone"]))
        kept = asyncio.ensure_future(batcher(["kept"]))
        await asyncio.sleep(0.01)
        gone.cancel()  # a timeout or a disconnect
        return await first, await kept

    assert run(one_gives_up()) == (["FIRST"], ["KEPT"])
    assert forward.batches == [["first"], ["kept"]]


@pytest.mark.parametrize("delay", [0.05])
def test_max_delay_holds_an_idle_model_back_for_companions(delay):
    forward = SlowUpper(seconds=0.0)
    batcher = Batcher(forward, max_batch_size=8, max_delay_s=delay)

    async def staggered():
        first = asyncio.ensure_future(batcher(["a"]))
        await asyncio.sleep(delay / 5)
        return await asyncio.gather(first, batcher(["b"]))

    assert run(staggered()) == [["A"], ["B"]]
    assert forward.batches == [["a", "b"]]


def test_length_chunks_group_similar_lengths_and_cover_every_text_once():
    lengths = [30, 5, 6, 31, 5, 29, 60, 6]
    chunks = length_chunks(lengths, max_size=8)
    assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
    assert chunks == [[1, 4, 2, 7], [5, 0, 3], [6]]  # 5-6 tokens, 29-31, and 60 alone
    for chunk in chunks:  # padding to the chunk's longest stays within MAX_PADDING of real tokens
        real = sum(lengths[i] for i in chunk)
        assert len(chunk) * max(lengths[i] for i in chunk) <= (1 + MAX_PADDING) * real
    assert [len(c) for c in length_chunks([7] * 10, max_size=4)] == [4, 4, 2]
    assert length_chunks([], max_size=4) == []
