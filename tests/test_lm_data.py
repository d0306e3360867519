"""causal_lm data: packing, prompt masking and truncation, the BPE tokenizer, and ingest -> validate ->
prepare through each stage's main() on a few dozen rows."""

from __future__ import annotations

import json
import random

import pandas as pd
import pytest

from lmforge.causal_lm import data as lm_data
from lmforge.causal_lm.data import IGNORE, encode_pair, pack_blocks
from lmforge.common import UserError
from lmforge.params import parse_params
from stages import ingest, prepare, validate
from tests.conftest import tmp_paths

EOS = 0
WORDS = ["apple", "honey", "rope", "bread", "lamp", "glass", "salt", "river", "door", "snow",
         "field", "stone", "wheel", "cloud", "kite", "boat"]


def lm_params(tmp_path, pairs: bool = False, **sections) -> object:
    """A tiny causal_lm params object with every path under tmp_path."""
    raw = {
        "task": "causal_lm",
        "paths": tmp_paths(tmp_path),
        "model": {"source": "scratch", "scratch": {"layers": 2, "heads": 2, "hidden": 32,
                                                   "context": 64, "vocab_size": 300}},
        "prepare": {"block_size": 32, "max_length": 64},
        "train": {"early_stopping": {"monitor": "val_loss", "mode": "min", "patience": 2}},
        "evaluate": {"generation": {"max_new_tokens": 16}},  # leaves room in the 64-token context
        "gate": {"floors": {"perplexity": {"max": 1e9}},
                 "tolerances": {"perplexity": {"direction": "lower", "rel": 0.1}}},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    if pairs:
        raw["data"] = {**raw.get("data", {}), "prompt_column": "prompt", "response_column": "response"}
    return parse_params(raw)


def stories(n: int = 40, seed: int = 0) -> list[str]:
    """Distinct multi-line documents."""
    rng = random.Random(seed)
    return [f"Story {i}: the {rng.choice(WORDS)} and the {rng.choice(WORDS)}.\n"
            f"Then {' '.join(rng.sample(WORDS, 3))} came by." for i in range(n)]


def pairs(n: int = 40, seed: int = 0) -> pd.DataFrame:
    """Distinct 'Uppercase: ...' prompts with their answers."""
    rng = random.Random(seed)
    prompts = [f"Uppercase: {' '.join(rng.sample(WORDS, 3))} {i}" for i in range(n)]
    return pd.DataFrame({"prompt": prompts,
                         "response": [p.removeprefix("Uppercase: ").upper() for p in prompts]})


# --- packing -------------------------------------------------------------------------------------

def test_packing_cuts_exact_blocks_with_eos_after_each_document():
    blocks = pack_blocks([[1, 2, 3], [4, 5], [6, 7, 8, 9]], EOS, block_size=4)
    assert blocks == [[1, 2, 3, EOS], [4, 5, EOS, 6], [7, 8, 9, EOS]]


def test_packing_keeps_the_last_partial_block():
    blocks = pack_blocks([[1, 2, 3], [4, 5, 6]], EOS, block_size=3)
    assert blocks == [[1, 2, 3], [EOS, 4, 5], [6, EOS]]
    assert sum(map(len, blocks)) == 3 + 3 + 2  # no token lost, one EOS per document
    assert pack_blocks([], EOS, 4) == []


# --- prompt masking and truncation --------------------------------------------------------------

def test_masking_ignores_exactly_the_prompt_tokens():
    ids, labels, truncated = encode_pair([11, 12, 13], [21, 22], EOS, max_length=16)
    assert ids == [11, 12, 13, 21, 22, EOS]
    assert labels == [IGNORE, IGNORE, IGNORE, 21, 22, EOS]
    assert not truncated


def test_masked_labels_decode_to_the_response_and_eos():
    tok = lm_data.train_bpe(iter(pairs()["response"].tolist() * 2), 300, 1)
    prompt = lm_data.format_prompt("### Prompt:\n{prompt}\n### Response:\n", "Uppercase: rope door")
    p_ids, r_ids = (tok(t, add_special_tokens=False)["input_ids"] for t in (prompt, "ROPE DOOR"))
    ids, labels, _ = encode_pair(p_ids, r_ids, tok.eos_token_id, max_length=64)
    kept = [t for t in labels if t != IGNORE]
    assert tok.decode(kept) == "ROPE DOOR" + lm_data.EOS
    assert tok.decode(ids[: len(p_ids)]) == prompt and labels[: len(p_ids)] == [IGNORE] * len(p_ids)


def test_truncation_cuts_the_prompt_from_the_left_first():
    ids, labels, truncated = encode_pair([1, 2, 3, 4, 5], [6, 7], EOS, max_length=5)
    assert ids == [4, 5, 6, 7, EOS] and labels == [IGNORE, IGNORE, 6, 7, EOS] and truncated


def test_truncation_then_cuts_the_response_from_the_right_without_eos():
    ids, labels, truncated = encode_pair([1, 2], [6, 7, 8, 9, 10], EOS, max_length=4)
    assert ids == [6, 7, 8, 9] and labels == [6, 7, 8, 9] and truncated  # a cut answer never stops
    exact = encode_pair([1, 2], [6, 7], EOS, max_length=5)
    assert exact == ([1, 2, 6, 7, EOS], [IGNORE, IGNORE, 6, 7, EOS], False)


def test_a_row_without_response_tokens_is_dropped():
    assert encode_pair([1, 2, 3], [], EOS, max_length=8) is None


# --- tokenizer -----------------------------------------------------------------------------------

def test_bpe_honours_vocab_size_round_trips_and_has_the_specials(tmp_path):
    from transformers import AutoTokenizer

    texts = stories(60)
    tok = lm_data.train_bpe(iter(texts), vocab_size=320, min_frequency=2)
    assert len(tok) == 320
    assert (tok.eos_token, tok.bos_token, tok.pad_token) == (lm_data.EOS, lm_data.EOS, lm_data.PAD)
    assert (tok.eos_token_id, tok.pad_token_id) == (0, 1)
    odd = "Ünïcode ✓ 🤗  two  spaces .\n\n\ttab"  # bytes never seen in training still round-trip
    for text in (texts[0], odd):
        ids = tok(text)["input_ids"]
        assert EOS not in ids and 1 not in ids  # no special token is added on encode
        assert tok.decode(ids) == text
    assert len(tok(texts[0])["input_ids"]) < len(texts[0].encode()) / 2  # merges were learned
    tok.save_pretrained(str(tmp_path / "tok"))
    again = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert again.is_fast and again.eos_token_id == 0 and again.pad_token_id == 1
    assert again(texts[1])["input_ids"] == tok(texts[1])["input_ids"]


def test_bpe_training_is_deterministic():
    texts = stories(60)
    a = lm_data.train_bpe(iter(texts), 400, 1)
    b = lm_data.train_bpe(iter(texts), 400, 1)
    assert a.get_vocab() == b.get_vocab()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()  # merges too, in order


def _saved_tokenizer(folder, **specials):
    """A pretrained-style folder holding only a tokenizer (no weights needed to load it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.add_special_tokens(["<eos>"])
    PreTrainedTokenizerFast(tokenizer_object=bpe, **specials).save_pretrained(str(folder))
    return str(folder)


def test_pretrained_tokenizer_gets_pad_from_eos_and_needs_an_eos(tmp_path):
    tok = lm_data.pretrained_tokenizer(_saved_tokenizer(tmp_path / "a", eos_token="<eos>"))
    assert tok.pad_token == "<eos>" and tok.pad_token_id == tok.eos_token_id
    with pytest.raises(UserError, match="has no eos_token"):
        lm_data.pretrained_tokenizer(_saved_tokenizer(tmp_path / "b"))


# --- the stages on a few dozen rows -------------------------------------------------------------

def run_data_stages(params) -> tuple[dict, dict, dict]:
    manifest = ingest.main(params)
    report = validate.main(params)
    return manifest, report, prepare.main(params)


def test_plain_text_through_ingest_validate_prepare(tmp_path):
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    src = tmp_path / "stories.txt"
    src.write_text("\n\n".join(stories(40)) + "\n")
    params = lm_params(tmp_path, data={"source": str(src)})
    manifest, report, stats = run_data_stages(params)

    assert manifest["rows"] == {"train": 32, "validation": 4, "test": 4, "total": 40}
    assert "labels" not in manifest and manifest["chars"]["total"] > 0
    assert report["success"] and report["label_set"] is None
    assert not any("label" in name for name in report["checks"])
    train = pd.read_parquet(params.paths.interim / "train.parquet")
    assert list(train.columns) == ["text"] and train["text"].str.contains("\n").all()

    out = params.paths.processed
    lm = json.loads((out / "lm.json").read_text())
    assert lm == {"task": "causal_lm", "format": "text", "template": None, "block_size": 32,
                  "max_length": 64, "eos_token_id": 0, "pad_token_id": 1}
    assert not (out / "labels.json").exists()
    dd = load_from_disk(str(out / "datasets"))
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    assert len(tok) == 300
    blocks = dd["train"]["input_ids"]
    assert dd["train"]["labels"] == blocks
    assert all(len(b) == 32 for b in blocks[:-1]) and 0 < len(blocks[-1]) <= 32
    flat = [t for b in blocks for t in b]
    assert flat.count(0) == 32 and flat[-1] == 0  # one EOS per train document
    assert tok.decode(flat[: flat.index(0)]) == train["text"].iloc[0]
    assert stats["train"] == {"texts": 32, "rows": len(blocks), "tokens": len(flat),
                              "truncated": 0, "dropped": 0}


def test_pairs_through_ingest_validate_prepare(tmp_path):
    from datasets import load_from_disk

    df = pairs(40)
    df = pd.concat([df, df.iloc[:2], pd.DataFrame({"prompt": ["Uppercase: x"], "response": [" "]})])
    src = tmp_path / "pairs.csv"
    df.assign(extra=1).to_csv(src, index=False)
    params = lm_params(tmp_path, pairs=True, data={"source": str(src)})
    manifest, report, stats = run_data_stages(params)

    assert manifest["dropped"] == {"source": {"empty": 1, "duplicate": 2}}
    assert manifest["rows"] == {"train": 32, "validation": 4, "test": 4, "total": 40}
    assert report["success"]
    assert {"test/prompt_length", "test/response_not_blank", "test/no_leakage_from_train"} <= set(
        report["checks"])
    test = pd.read_parquet(params.paths.interim / "test.parquet")
    assert list(test.columns) == ["prompt", "response"]  # the user's names; extra columns gone

    lm = json.loads((params.paths.processed / "lm.json").read_text())
    assert lm["format"] == "pairs" and lm["template"] == params.prepare.template
    dd = load_from_disk(str(params.paths.processed / "datasets"))
    row = dd["test"][0]
    assert (row["prompt"], row["response"]) == (test["prompt"].iloc[0], test["response"].iloc[0])
    assert len(row["input_ids"]) == len(row["labels"]) and row["labels"][-1] == lm["eos_token_id"]
    n_prompt = row["labels"].count(IGNORE)
    assert n_prompt > 0 and IGNORE not in row["labels"][n_prompt:]
    assert stats["test"]["rows"] == 4 and stats["test"]["dropped"] == 0


def test_pairs_truncation_is_counted(tmp_path):
    df = pairs(40).assign(response=lambda d: d["response"] + " " + " ".join(WORDS).upper())
    src = tmp_path / "long.csv"
    df.to_csv(src, index=False)
    params = lm_params(tmp_path, pairs=True, data={"source": str(src)},
                       prepare={"max_length": 16})
    _, _, stats = run_data_stages(params)
    assert stats["train"]["truncated"] == stats["train"]["rows"] == 32
    from datasets import load_from_disk

    lengths = {len(x) for x in load_from_disk(str(params.paths.processed / "datasets"))["train"]
               ["input_ids"]}
    assert lengths == {16}
