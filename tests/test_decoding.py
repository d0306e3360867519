"""Batched decoding across requests (bento/decoding.py), on tiny GPT-2 and Llama models built from a
config: the same tokens as model.generate, one forward pass per token for a whole batch, per-row
options (seed, stop strings, top_p, length), and rows that leave the batch."""

from __future__ import annotations

import asyncio

import pytest
import torch

from bento.decoding import Delta, Done, Engine, Job, Sampling, decode_batch, held_back
from tests.helpers import LM_TEXTS, tiny_gpt2, train_bpe

PAD = 1


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(LM_TEXTS)


def tiny_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval()


def prompts(tokenizer) -> list[list[int]]:
    texts = ["the kettle", "a lamp lights the room at night and", "my"]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def run(model, tokenizer, rows, samplings) -> list[list]:
    """decode_batch over rows; the events each job emitted."""
    events = [[] for _ in rows]
    jobs = [Job(r, s, events[i].append) for i, (r, s) in enumerate(zip(rows, samplings, strict=True))]
    decode_batch(model, jobs, PAD, {tokenizer.eos_token_id},
                 lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    return events


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_batch_decodes_each_row_as_generate_does_alone(tokenizer, arch):
    model = tiny_gpt2(tokenizer) if arch == "gpt2" else tiny_llama(tokenizer)
    rows = prompts(tokenizer)
    lengths = [6, 12, 9]  # rows leave the batch at different steps
    events = run(model, tokenizer, rows, [Sampling(n) for n in lengths])
    for row, n, got in zip(rows, lengths, events, strict=True):
        alone = model.generate(torch.tensor([row]), attention_mask=torch.ones(1, len(row), dtype=int),
                               max_new_tokens=n, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=PAD)
        expected = tokenizer.decode(alone[0, len(row):], skip_special_tokens=True)
        done = got[-1]
        assert isinstance(done, Done) and done.text == expected
        new = alone[0, len(row):].tolist()
        finish = "eos" if new[-1] == tokenizer.eos_token_id else "length"
        assert (done.tokens, done.finish_reason, done.prompt_tokens) == (len(new), finish, len(row))
        assert "".join(e.text for e in got[:-1]) == done.text  # the pieces add up to the answer


def test_concurrent_requests_share_forward_passes(tokenizer):
    model = tiny_gpt2(tokenizer)
    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append(1))
    engine = Engine(model, tokenizer, {tokenizer.eos_token_id}, PAD, max_batch_size=8)
    rows = prompts(tokenizer) * 2  # six requests

    async def together():
        return await asyncio.gather(*(engine.complete(r, Sampling(10)) for r in rows))

    answers = asyncio.run(together())
    assert [a.tokens for a in answers] == [10] * 6
    assert len(calls) == 10  # one prefill and nine steps for all six, not 60 passes
    assert answers[:3] == answers[3:]


def test_max_batch_size_splits_the_queue_into_batches(tokenizer):
    model = tiny_gpt2(tokenizer)
    sizes = []
    engine = Engine(model, tokenizer, {tokenizer.eos_token_id}, PAD, max_batch_size=2,
                    on_batch=sizes.append)

    async def together():
        return await asyncio.gather(*(engine.complete(r, Sampling(3)) for r in prompts(tokenizer)))

    asyncio.run(together())
    assert sizes == [2, 1]


def test_a_seeded_sample_is_the_same_whatever_the_batch(tokenizer):
    model = tiny_gpt2(tokenizer)
    rows = prompts(tokenizer)
    seeded = Sampling(12, temperature=1.0, top_p=0.9, seed=7)
    alone = run(model, tokenizer, [rows[1]], [seeded])[0][-1]
    in_batch = run(model, tokenizer, rows, [Sampling(5), seeded, Sampling(12, temperature=1.0)])
    assert in_batch[1][-1] == alone
    other = run(model, tokenizer, [rows[1]], [Sampling(12, temperature=1.0, seed=8)])[0][-1]
    assert other.text != alone.text
    # top_p so small that only the most probable token is left: greedy, whatever the seed.
    narrow = run(model, tokenizer, [rows[1]], [Sampling(12, temperature=1.5, top_p=1e-6, seed=3)])
    assert narrow[0][-1].text == run(model, tokenizer, [rows[1]], [Sampling(12)])[0][-1].text


def test_a_stop_string_ends_the_answer_before_it_and_is_never_sent(tokenizer):
    model = tiny_gpt2(tokenizer)
    row = prompts(tokenizer)[1]
    full = run(model, tokenizer, [row], [Sampling(16)])[0][-1].text
    stop = full[5:8]  # three characters the greedy answer reaches
    events = run(model, tokenizer, [row], [Sampling(16, stop=(stop,))])[0]
    done = events[-1]
    assert done.finish_reason == "stop" and done.text == full[: full.find(stop)]
    sent = "".join(e.text for e in events if isinstance(e, Delta))
    assert sent == done.text and stop not in sent


def test_held_back_keeps_a_possible_stop_start_and_a_partial_character():
    assert held_back("hello wor", ("world",)) == 3
    assert held_back("hello", ("world",)) == 0
    assert held_back("caf\ufffd", ()) == 1
    assert held_back("abc", ("c", "bcd")) == 2


def test_a_cancelled_request_leaves_the_batch_and_the_others_finish(tokenizer):
    model = tiny_gpt2(tokenizer)
    rows = prompts(tokenizer)
    events = [[] for _ in rows]
    jobs = [Job(r, Sampling(10), events[i].append) for i, r in enumerate(rows)]
    jobs[0].cancelled = True
    decode_batch(model, jobs, PAD, {tokenizer.eos_token_id},
                 lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    assert jobs[0].generated == [] and events[0] == []  # gone before its first token
    assert [len(j.generated) for j in jobs[1:]] == [10, 10]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_requests_that_queue_meanwhile_join_the_running_batch(tokenizer, arch):
    """Continuous batching: rows joining between passes (with prompts longer and shorter than the
    batch's width) decode exactly as they would alone, and share the batch's passes."""
    model = tiny_gpt2(tokenizer) if arch == "gpt2" else tiny_llama(tokenizer)
    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append(1))
    first, longer, shorter = prompts(tokenizer)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    events = {name: [] for name in ("first", "longer", "shorter", "late")}
    jobs = {name: Job(ids, Sampling(8), events[name].append) for name, ids in
            (("first", first), ("longer", longer), ("shorter", shorter), ("late", first))}
    arrivals = [[jobs["longer"], jobs["shorter"]], [], [], [jobs["late"]]]  # per boundary

    def more(n):
        return arrivals.pop(0)[:n] if arrivals else []

    decode_batch(model, [jobs["first"]], PAD, {tokenizer.eos_token_id}, decode, more, max_rows=8)

    for name, ids in (("first", first), ("longer", longer), ("shorter", shorter), ("late", first)):
        alone = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=int),
                               max_new_tokens=8, do_sample=False, pad_token_id=PAD,
                               eos_token_id=tokenizer.eos_token_id)
        assert events[name][-1].text == tokenizer.decode(alone[0, len(ids):], skip_special_tokens=True)
    # 4 generate() calls above made 32 passes; the batch: 3 prefills and the steps of the
    # longest-running row (the late one: joined at the 4th boundary, 8 tokens) -> 3 + 3 + 7 = 13.
    assert len(calls) - 4 * 8 == 13
