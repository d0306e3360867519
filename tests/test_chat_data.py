"""Conversations in prepare (lmforge/causal_lm/chat.py): the default chat template saved with the
tokenizer, exactly which token positions carry loss on a real multi-turn conversation, the oldest
turns dropped (or refused) over max_length, and the three source formats giving byte-identical
tokenized datasets."""

from __future__ import annotations

import json

import pytest

from lmforge.causal_lm import chat
from lmforge.causal_lm import data as lm_data
from lmforge.common import IGNORE, UserError, write_json
from lmforge.params import parse_params
from stages import ingest, prepare
from tests.conftest import tmp_paths

EOS = lm_data.EOS
CONVERSATION = [
    {"role": "system", "content": "You edit word lists."},
    {"role": "user", "content": "Reverse the words: snow field wheel"},
    {"role": "assistant", "content": "wheel field snow"},
    {"role": "user", "content": "Now write them in capitals."},
    {"role": "assistant", "content": "WHEEL FIELD SNOW"},
]


@pytest.fixture(scope="module")
def tokenizer():
    """The from-scratch BPE as prepare trains it for conversations, with the default template."""
    texts = chat.training_texts([CONVERSATION] * 3)
    tok = lm_data.train_bpe(texts, vocab_size=300, min_frequency=1, specials=(chat.IM_START,))
    assert chat.ensure_template(tok) == "default"
    return tok


def test_the_default_template_is_chatml_style_with_eos_closing_each_message(tokenizer):
    text = chat.render(tokenizer, CONVERSATION[:2], add_generation_prompt=True)
    assert text == (f"<|im_start|>system\nYou edit word lists.{EOS}\n"
                    f"<|im_start|>user\nReverse the words: snow field wheel{EOS}\n"
                    "<|im_start|>assistant\n")
    assert chat.ensure_template(tokenizer) == "tokenizer"  # a template of its own is kept


def pieces(messages: list[dict]) -> list[tuple[str, bool]]:
    """The default template's text in pieces no BPE merge crosses, each with whether the loss
    counts it: an assistant message's content and its EOS."""
    out = []
    for m in messages:
        counted = m["role"] == "assistant"
        out += [(chat.IM_START, False), (m["role"], False), ("\n", False),
                (m["content"], counted), (EOS, counted), ("\n", False)]
    return out


def test_exactly_the_assistant_tokens_of_every_turn_carry_loss(tokenizer):
    ids, labels = chat.encode(tokenizer, CONVERSATION, last_only=False)

    # The expectation, built independently: each piece tokenized on its own.
    expected_ids, expected_labels = [], []
    for text, counted in pieces(CONVERSATION):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        expected_ids += piece
        expected_labels += piece if counted else [IGNORE] * len(piece)
    assert ids == expected_ids
    assert labels == expected_labels
    counted = [i for i, label in enumerate(labels) if label != IGNORE]
    # Two runs of positions: the first answer + EOS, the second answer + EOS, nothing else.
    runs = [[counted[0]]]
    for i in counted[1:]:
        runs[-1].append(i) if i == runs[-1][-1] + 1 else runs.append([i])
    assert len(runs) == 2
    first, second = (tokenizer.decode([ids[i] for i in run]) for run in runs)
    assert (first, second) == (f"wheel field snow{EOS}", f"WHEEL FIELD SNOW{EOS}")
    assert all(labels[i] == ids[i] for i in counted)
    # The newline after an assistant's EOS and the next message's header carry none.
    assert labels[runs[0][-1] + 1] == IGNORE


def test_last_turn_only_counts_the_last_assistant_message(tokenizer):
    ids, labels = chat.encode(tokenizer, CONVERSATION, last_only=True)
    counted = [ids[i] for i, label in enumerate(labels) if label != IGNORE]
    assert tokenizer.decode(counted) == f"WHEEL FIELD SNOW{EOS}"


def test_over_max_length_the_oldest_exchange_goes_and_the_system_message_stays(tokenizer):
    full, _ = chat.encode(tokenizer, CONVERSATION, last_only=False)
    shorter = [CONVERSATION[0], *CONVERSATION[3:]]
    kept, _ = chat.encode(tokenizer, shorter, last_only=False)
    encoded = chat.fit_conversation(tokenizer, CONVERSATION, len(full) - 1, False, False, "x")
    assert encoded.messages == shorter and encoded.turns_dropped == 2
    assert encoded.input_ids == kept
    # Even the last exchange over max_length: the conversation is dropped (None), or refused.
    assert chat.fit_conversation(tokenizer, CONVERSATION, 8, False, False, "x") is None
    with pytest.raises(UserError, match=rf"train conversation 3: {len(full)} tokens, over "
                                        r"prepare.max_length \(20\)"):
        chat.fit_conversation(tokenizer, CONVERSATION, 20, False, True, "train conversation 3")


def test_a_template_that_is_not_prefix_stable_is_refused(tokenizer):
    tok = lm_data.train_bpe(["a b c"], 300, 1)
    # Renders the last message differently from the others: prefixes do not line up.
    tok.chat_template = ("{% for m in messages %}{% if loop.last %}[{{ m['content'] }}]{% else %}"
                         "{{ m['content'] }}{% endif %}{% endfor %}")
    with pytest.raises(UserError, match="does not render a conversation prefix by prefix"):
        chat.encode(tok, CONVERSATION, last_only=False)


# --- through ingest and prepare -------------------------------------------------------------------

def word_conversations(n: int, turns: int) -> list[list[dict]]:
    words = ["apple", "river", "stone", "cloud", "lamp", "bread", "song", "field"]
    out = []
    for i in range(n):
        w = [words[(i + k) % 8] for k in range(3)] + [str(i)]
        messages = [{"role": "system", "content": "Answer with the words only."}] if i % 3 else []
        messages += [{"role": "user", "content": f"Reverse the words: {' '.join(w)}"},
                     {"role": "assistant", "content": " ".join(w[::-1])}]
        if turns > 1:
            messages += [{"role": "user", "content": "Now in capitals."},
                         {"role": "assistant", "content": " ".join(w).upper()}]
        out.append(messages)
    return out


def in_format(messages: list[dict], fmt: str) -> dict:
    if fmt == "messages":
        return {"messages": messages}
    if fmt == "sharegpt":
        names = {"system": "system", "user": "human", "assistant": "gpt"}
        return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in messages]}
    system = [m["content"] for m in messages if m["role"] == "system"]
    return {"instruction": messages[-2]["content"], "input": "", "output": messages[-1]["content"],
            **({"system": system[0]} if system else {})}


def prepared(tmp_path, rows: list[dict], **prepare_params) -> object:
    """ingest + prepare of ``rows`` (a JSONL source) from scratch; validation taken as passed."""
    tmp_path.mkdir(exist_ok=True)
    source = tmp_path / "chats.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = parse_params({
        "task": "causal_lm", "paths": tmp_paths(tmp_path),
        "data": {"source": str(source), "chat": {}, "split": {"validation": 0.2, "test": 0.2}},
        "model": {"source": "scratch", "scratch": {"layers": 2, "heads": 2, "hidden": 32,
                                                   "context": 128, "vocab_size": 300}},
        "prepare": {"max_length": 128, **prepare_params},
        "train": {"early_stopping": None},
        "evaluate": {"generation": {"max_new_tokens": 16}},
        "gate": {"floors": {"perplexity": {"max": 1e9}}, "tolerances": {}}})
    ingest.main(params)
    write_json(params.paths.validation, {"success": True})
    prepare.main(params)
    return params


def files(folder) -> dict[str, bytes]:
    """Every file under a prepared folder, less the random fingerprints datasets writes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "state.json"}


@pytest.mark.parametrize("turns", [1, 2], ids=["single exchange", "multi-turn"])
def test_the_same_conversations_in_each_format_give_byte_identical_datasets(tmp_path, turns):
    conversations = word_conversations(30, turns)
    formats = ("messages", "sharegpt", "alpaca") if turns == 1 else ("messages", "sharegpt")
    outputs = {}
    for fmt in formats:
        params = prepared(tmp_path / fmt, [in_format(m, fmt) for m in conversations])
        outputs[fmt] = files(params.paths.processed)
    reference = outputs["messages"]
    assert any(name.endswith(".arrow") for name in reference)
    assert "tokenizer/chat_template.jinja" in reference
    for fmt in formats[1:]:
        assert outputs[fmt] == reference, fmt


def test_prepare_writes_the_chat_rows_the_template_and_the_stats(tmp_path):
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    conversations = word_conversations(30, 2)
    params = prepared(tmp_path, [{"messages": m} for m in conversations], max_length=64)

    stats = json.loads((params.paths.processed / "stats.json").read_text())
    lm = json.loads((params.paths.processed / "lm.json").read_text())
    assert lm["format"] == "chat" and lm["chat_loss"] == "all_turns" and lm["template"] is None
    tokenizer = AutoTokenizer.from_pretrained(str(params.paths.processed / "tokenizer"))
    assert tokenizer.chat_template == chat.DEFAULT_CHAT_TEMPLATE
    test = load_from_disk(str(params.paths.processed / "datasets"))["test"]
    row = test[0]
    prompt = json.loads(row["prompt"])
    assert prompt[-1]["role"] == "user" and row["response"] == row["response"].upper()
    assert max(len(r) for r in test["input_ids"]) <= 64
    # 64 tokens hold the last exchange (at most 58) but never two (at least 72): every
    # conversation lost its first one, none was dropped.
    for split in ("train", "validation", "test"):
        assert stats[split]["truncated"] == stats[split]["rows"] == stats[split]["texts"]
        assert stats[split]["turns_dropped"] == 2 * stats[split]["rows"]
        assert stats[split]["dropped"] == 0 and stats[split]["assistant_tokens"] > 0


def test_evaluate_scores_assistant_tokens_and_the_last_assistant_message(tmp_path, monkeypatch):
    import pandas as pd
    from transformers import AutoTokenizer

    from lmforge import tracking
    from lmforge.causal_lm import model as lm
    from stages import evaluate

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = prepared(tmp_path / "run", [{"messages": m} for m in word_conversations(30, 2)])
    params = params.model_copy(update={"evaluate": params.evaluate.model_copy(
        update={"max_generations": 4})})
    processed = params.paths.processed
    tokenizer = AutoTokenizer.from_pretrained(str(processed / "tokenizer"))
    # The starting model as the trained one (as tests/test_lm_evaluate.py does): the scoring is
    # what is checked here, not the learning.
    lm.start_model(params, tokenizer).save_pretrained(str(params.paths.model))
    tokenizer.save_pretrained(str(params.paths.model))
    (params.paths.model / "lm.json").write_text((processed / "lm.json").read_text())
    tracking.start_run(params, ("train",), "hash")

    metrics = evaluate.main(params)

    stats = json.loads((processed / "stats.json").read_text())
    assert metrics["tokens"] == stats["test"]["assistant_tokens"]  # the loss's tokens, no others
    assert metrics["n"] == stats["test"]["rows"] and metrics["generated"] == 4
    assert {"bleu", "rouge1", "rouge2", "rougeL", "exact_match"} <= set(metrics)
    generations = pd.read_csv(params.paths.eval_reports / "generations.csv", keep_default_na=False)
    test = pd.read_parquet(params.paths.interim / "test.parquet")
    assert generations["reference"].tolist() == [m[-1]["content"] for m in test["messages"][:4]]
    assert [json.loads(p)[-1]["content"] for p in generations["prompt"]] == [
        m[-2]["content"] for m in test["messages"][:4]]


def test_a_pretrained_tokenizer_without_a_template_gets_the_default_with_im_start_as_text(tmp_path):
    import pandas as pd

    from tests.helpers import tiny_gpt2, train_bpe

    folder = tmp_path / "base"
    base = train_bpe(["the kettle boils", "Reverse the words: snow field wheel"])
    base.save_pretrained(str(folder))
    tiny_gpt2(base).save_pretrained(str(folder))
    params = parse_params({"task": "causal_lm", "model": {"source": str(folder)},
                           "data": {"chat": {}}, "train": {"early_stopping": None},
                           "gate": {"floors": {"perplexity": {"max": 1e9}}, "tolerances": {}}})
    tokenizer = lm_data.lm_tokenizer(params, pd.DataFrame({"messages": [CONVERSATION]}))
    assert tokenizer.chat_template == chat.DEFAULT_CHAT_TEMPLATE
    assert chat.IM_START not in tokenizer.get_vocab()  # no new token: plain text for this model
    ids, labels = chat.encode(tokenizer, CONVERSATION, last_only=False)
    counted = [ids[i] for i, label in enumerate(labels) if label != IGNORE]
    assert tokenizer.decode(counted) == f"wheel field snow{EOS}WHEEL FIELD SNOW{EOS}"
