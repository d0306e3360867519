"""Prepare: label mapping, tokenization without padding, and refusal to run on unvalidated data."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from lmforge.classification import data as clf_data
from lmforge.common import UserError, write_json
from lmforge.data.cleaning import label_set
from lmforge.params import parse_params
from stages import prepare


def test_label_set_is_given_order_or_sorted_numerically():
    assert label_set(pd.Series(["b", "a", None, "b"]), None) == ["a", "b"]
    assert label_set(pd.Series(["10", "2", "1"]), None) == ["1", "2", "10"]
    assert label_set(pd.Series(["a"]), ["z", "a"]) == ["z", "a"]


def test_label_mapping_round_trips():
    m = clf_data.label_mapping(["neg", "pos"])
    assert m["id2label"] == {"0": "neg", "1": "pos"}
    assert all(m["id2label"][str(i)] == name for name, i in m["label2id"].items())


def test_unknown_label_is_named():
    with pytest.raises(UserError, match=r"\['maybe'\] are not in the label set"):
        clf_data.encode_labels(pd.Series(["pos", "maybe"]), {"pos": 0, "neg": 1}, "test")


def _setup(tmp_path, rows, tiny_model_dir, success=True, max_length=64):
    interim = tmp_path / "interim"
    interim.mkdir()
    for i, split in enumerate(("train", "validation", "test")):
        rows.iloc[i * 12 : (i + 1) * 12].to_parquet(interim / f"{split}.parquet")
    write_json(tmp_path / "validation.json", {"success": success})
    return parse_params({
        "paths": {"interim": str(interim), "processed": str(tmp_path / "processed"),
                  "validation": str(tmp_path / "validation.json")},
        "model": {"source": str(tiny_model_dir)},
        "prepare": {"max_length": max_length},
        "data": {"labels": ["negative", "neutral", "positive"]},
    })


def test_main_tokenizes_every_split_without_padding(tmp_path, rows, tiny_model_dir):
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    stats = prepare.main(_setup(tmp_path, rows, tiny_model_dir))
    out = tmp_path / "processed"
    dd = load_from_disk(str(out / "datasets"))
    assert set(dd) == {"train", "validation", "test"}
    assert {"text", "labels", "input_ids", "attention_mask"} <= set(dd["train"].column_names)
    lengths = {len(x) for x in dd["train"]["input_ids"]}
    assert len(lengths) > 1  # no padding: rows keep their own length
    ids = {tok for row in dd["train"]["input_ids"] for tok in row}
    assert not ids & {0, 1}  # no [PAD] (unpadded) and no [UNK] (the vocab covers the rows)
    labels = json.loads((out / "labels.json").read_text())
    assert labels["label2id"] == {"negative": 0, "neutral": 1, "positive": 2}
    first = dd["test"][0]
    assert labels["id2label"][str(first["labels"])] == rows.iloc[24]["label"]
    assert AutoTokenizer.from_pretrained(str(out / "tokenizer")).vocab_size > 10
    assert stats["train"]["rows"] == 12 and stats["train"]["truncated"] == 0


def test_truncation_to_max_length(tmp_path, rows, tiny_model_dir):
    stats = prepare.main(_setup(tmp_path, rows, tiny_model_dir, max_length=8))
    assert stats["train"]["tokens_max"] == 8 and stats["train"]["truncated"] == 12


def test_refuses_data_that_failed_validation(tmp_path, rows, tiny_model_dir):
    with pytest.raises(UserError, match="failed validation"):
        prepare.main(_setup(tmp_path, rows, tiny_model_dir, success=False))
    assert not (tmp_path / "processed").exists()


def test_unknown_model_source_fails_clearly(tmp_path, rows, tiny_model_dir):
    params = _setup(tmp_path, rows, tiny_model_dir)
    params = params.model_copy(update={"model": params.model.model_copy(
        update={"source": "no-such-org/no-such-model"})})
    with pytest.raises(UserError, match="neither a local model folder nor a reachable hub id"):
        prepare.main(params)
    with pytest.raises(UserError, match="package 'not_a_pkg' is not installed"):
        from lmforge.models import resolve_model_source
        resolve_model_source("package:not_a_pkg/model")


def _pretrained_tokenizer_folder(folder, eos: str | None):
    """A model folder holding only a byte-level BPE tokenizer with an eos and no pad token."""
    from lmforge.causal_lm.data import train_bpe

    tok = train_bpe(iter(["some text to learn from"] * 3), 300, 1)
    tok.save_pretrained(str(folder))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    for key in ("pad_token", "bos_token") + (() if eos else ("eos_token",)):
        config.pop(key, None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(folder))
    assert loaded.pad_token is None and (loaded.eos_token is None) != bool(eos)
    return folder


@pytest.mark.parametrize("eos", [True, False])
def test_causal_lm_with_a_pretrained_tokenizer_pads_with_eos_or_refuses(tmp_path, eos):
    from transformers import AutoTokenizer

    interim = tmp_path / "interim"
    interim.mkdir()
    for split in ("train", "validation", "test"):
        pd.DataFrame({"text": [f"{split} text {i}\nline" for i in range(6)]}).to_parquet(
            interim / f"{split}.parquet")
    write_json(tmp_path / "validation.json", {"success": True})
    params = parse_params({
        "task": "causal_lm",
        "paths": {"interim": str(interim), "processed": str(tmp_path / "processed"),
                  "validation": str(tmp_path / "validation.json")},
        "model": {"source": str(_pretrained_tokenizer_folder(tmp_path / "model", eos))},
        "prepare": {"block_size": 16},
        "train": {"early_stopping": {"monitor": "val_loss", "mode": "min"}},
        "gate": {"floors": {}, "tolerances": {}},
    })
    if not eos:
        with pytest.raises(UserError, match="has no eos_token"):
            prepare.main(params)
        return
    stats = prepare.main(params)
    out = tmp_path / "processed"
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    lm = json.loads((out / "lm.json").read_text())
    assert tok.pad_token == tok.eos_token and lm["pad_token_id"] == lm["eos_token_id"] == 0
    assert stats["validation"]["texts"] == 6 and stats["validation"]["rows"] >= 1
