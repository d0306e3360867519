"""causal_lm model side: the starting model, LoRA, token-weighted validation NLL, and stage train on a
tiny processed dataset (a byte-level BPE trained here, 2-layer hidden-32 models)."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from lmforge.causal_lm import model as lm
from lmforge.common import UserError
from lmforge.params import Params, Train, parse_params
from lmforge.training import lit
from stages import train
from tests.conftest import make_rows, tmp_paths

EOS, PAD = "<|endoftext|>", "<|pad|>"
TEMPLATE = "### Prompt:\n{prompt}\n### Response:\n"
BLOCK = 32


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return make_rows(n_per_class=12, seed=3)["text"].tolist()  # 36 short reviews


@pytest.fixture(scope="module")
def tokenizer(texts):
    """A byte-level BPE of 300 tokens trained on the texts, with prepare's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=300, min_frequency=2, special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, pad_token=PAD)


def lm_params(root, source: str = "scratch", **model) -> Params:
    return parse_params({
        "task": "causal_lm",
        "paths": tmp_paths(root),
        "model": {"source": source, "scratch": {"layers": 2, "heads": 2, "hidden": 32, "context": 64,
                                                "vocab_size": 300}, **model},
        "prepare": {"block_size": BLOCK, "max_length": 64, "template": TEMPLATE},
        "train": {"batch_size": 4, "eval_batch_size": 8, "max_epochs": 2, "learning_rate": 1e-2,
                  "warmup_ratio": 0.0, "log_every_n_steps": 1, "accelerator": "cpu",
                  "early_stopping": {"monitor": "val_loss", "mode": "min", "patience": 2}},
        "evaluate": {"generation": {"max_new_tokens": 16}},  # below the context of 64
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}"},
        "gate": {"floors": {"perplexity": {"max": 1e9}},
                 "tolerances": {"perplexity": {"direction": "lower", "rel": 0.1}}},
    })


def packed(texts: list[str], tokenizer) -> dict:
    """Plain text as prepare packs it: documents + EOS, concatenated, cut into BLOCK-token rows."""
    ids = [i for t in texts for i in tokenizer(t, add_special_tokens=False)["input_ids"]
           + [tokenizer.eos_token_id]]
    blocks = [ids[k : k + BLOCK] for k in range(0, len(ids), BLOCK)]
    return {"input_ids": blocks, "labels": [list(b) for b in blocks]}


def pairs(texts: list[str], tokenizer) -> dict:
    """Prompt/response rows as prepare builds them: the templated prompt masked with -100."""
    rows = {"input_ids": [], "labels": [], "prompt": [], "response": []}
    for text in texts:
        prompt, response = text.split(" is ", 1)
        head = tokenizer(TEMPLATE.format(prompt=prompt), add_special_tokens=False)["input_ids"]
        tail = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows["input_ids"].append(head + tail)
        rows["labels"].append([-100] * len(head) + tail)
        rows["prompt"].append(prompt)
        rows["response"].append(response)
    return rows


def write_processed(params: Params, texts: list[str], tokenizer, fmt: str = "text") -> None:
    """paths.processed in the contract's layout: datasets/, tokenizer/, lm.json."""
    from datasets import Dataset, DatasetDict

    out = params.paths.processed
    make = packed if fmt == "text" else pairs
    cuts = {"train": texts[:24], "validation": texts[24:30], "test": texts[30:]}
    DatasetDict({s: Dataset.from_dict(make(t, tokenizer)) for s, t in cuts.items()}).save_to_disk(
        str(out / "datasets"))
    tokenizer.save_pretrained(str(out / "tokenizer"))
    (out / "lm.json").write_text(json.dumps({
        "task": "causal_lm", "format": fmt, "template": TEMPLATE if fmt == "pairs" else None,
        "block_size": BLOCK, "max_length": 64, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id}))


@pytest.fixture
def pretrained_dir(tmp_path, tokenizer):
    """A tiny GPT-2 saved like a hub model (safetensors, with its tokenizer)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "tiny-gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2,
                               n_head=2, eos_token_id=tokenizer.eos_token_id,
                               bos_token_id=tokenizer.eos_token_id)).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


# --- the starting model ----------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_start_model_is_the_same_for_a_seed(tmp_path, tokenizer, architecture):
    params = lm_params(tmp_path, scratch={"architecture": architecture, "layers": 2, "heads": 2,
                                          "hidden": 32, "context": 64, "dropout": 0.2})
    first, second = lm.start_model(params, tokenizer), lm.start_model(params, tokenizer)
    torch.rand(5)  # the global RNG in between does not matter: start_model seeds itself
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    reseeded = params.model_copy(update={"train": params.train.model_copy(update={"seed": 7})})
    other = lm.start_model(reseeded, tokenizer).state_dict()
    assert any(not torch.equal(a[k], other[k]) for k in a)

    config = first.config
    assert config.vocab_size == len(tokenizer) == 300
    assert config.eos_token_id == config.bos_token_id == tokenizer.eos_token_id
    assert config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    if architecture == "gpt2":
        assert (config.n_positions, config.n_inner, config.resid_pdrop) == (64, 128, 0.2)
    else:
        assert (config.max_position_embeddings, config.intermediate_size) == (64, 128)
        assert config.attention_dropout == 0.2


def test_start_model_loads_a_pretrained_folder_and_grows_its_embeddings(tmp_path, tokenizer,
                                                                       pretrained_dir):
    params = lm_params(tmp_path, source=str(pretrained_dir))
    model = lm.start_model(params, tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    tokenizer_plus = tokenizer.__class__.from_pretrained(str(pretrained_dir))
    tokenizer_plus.add_tokens(["<|new|>"])  # a larger tokenizer than the model
    grown = lm.start_model(params, tokenizer_plus)
    assert grown.get_input_embeddings().weight.shape[0] == len(tokenizer) + 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="cannot load a causal language model"):
        lm.start_model(lm_params(tmp_path, source=str(tmp_path / "empty")), tokenizer)


# --- LoRA ------------------------------------------------------------------------------------------


def test_lora_trains_only_the_adapters_and_merges_to_the_same_logits(tmp_path, tokenizer,
                                                                    pretrained_dir, texts):
    params = lm_params(tmp_path, source=str(pretrained_dir),
                       lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["c_attn"]})
    model = lm.trainable_model(params, tokenizer)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    batch = lit.pad_batch([{"input_ids": r, "labels": r} for r in packed(texts[:8], tokenizer)
                           ["input_ids"]], tokenizer.pad_token_id)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # lora_B starts at zero: after one step only B moved
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable

    model.eval()
    with torch.no_grad():
        adapted = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        plain = lm.merged(model)
        assert not any("lora_" in n for n in plain.state_dict())
        torch.testing.assert_close(plain(**{k: v for k, v in batch.items() if k != "labels"}).logits,
                                   adapted, atol=1e-5, rtol=1e-4)


def test_unknown_lora_target_modules_name_the_layers_that_exist(tmp_path, tokenizer, pretrained_dir):
    params = lm_params(tmp_path, source=str(pretrained_dir), lora={"target_modules": ["q_proj"]})
    with pytest.raises(UserError, match=r"model.lora.target_modules \['q_proj'\].*c_attn, c_fc"):
        lm.trainable_model(params, tokenizer)


# --- validation NLL --------------------------------------------------------------------------------


def test_pad_batch_pads_token_labels_with_minus_100_and_builds_the_attention_mask():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "prompt": "p"},
            {"input_ids": [8], "labels": [8], "prompt": "q"}]
    batch = lit.pad_batch([{k: v for k, v in r.items() if k != "prompt"} for r in rows], pad_id=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_validation_loss_is_the_token_weighted_nll_of_the_whole_set(tmp_path, tokenizer):
    model = lm.start_model(lm_params(tmp_path), tokenizer)
    module = lm.CausalLM(model, Train())
    module.eval()  # dropout off: the hand computation below sees the same logits
    batches = [  # 1 + 4 target tokens (masked prompt, padding), then 7: unequal batch weights
        lit.pad_batch([{"input_ids": [10, 11, 12], "labels": [-100, -100, 12]},
                       {"input_ids": [13, 14, 15, 16, 17], "labels": [-100, 14, 15, 16, 17]}], 1),
        lit.pad_batch([{"input_ids": list(range(20, 28)), "labels": list(range(20, 28))}], 1),
    ]
    nll, counts = [], []
    with torch.no_grad():
        for i, batch in enumerate(batches):
            module.validation_step(batch, i)
            logp = model(input_ids=batch["input_ids"],
                         attention_mask=batch["attention_mask"]).logits.log_softmax(-1)
            terms = [-logp[b, t - 1, label].item() for b, row in enumerate(batch["labels"].tolist())
                     for t, label in enumerate(row) if t > 0 and label != -100]
            nll.append(sum(terms))
            counts.append(len(terms))
    assert counts == [5, 7]
    loss = module.val_nll.compute().item()
    assert loss == pytest.approx(sum(nll) / sum(counts), rel=1e-5)
    mean_of_means = sum(n / c for n, c in zip(nll, counts, strict=True)) / len(nll)
    assert abs(loss - mean_of_means) > 1e-4  # the test tells the two apart


# --- stage train -----------------------------------------------------------------------------------


def test_train_from_scratch_writes_a_causal_lm_and_its_metrics(tmp_path, monkeypatch, tokenizer, texts):
    import mlflow
    from transformers import AutoModelForCausalLM, GenerationConfig

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = lm_params(tmp_path)
    write_processed(params, texts, tokenizer)
    start = lm.start_model(params, tokenizer).state_dict()

    metrics = train.main(params)

    p = params.paths
    model = AutoModelForCausalLM.from_pretrained(str(p.model))
    trained = model.state_dict()
    assert any(not torch.equal(start[k], trained[k]) for k in start)
    assert json.loads((p.model / "lm.json").read_text()) == json.loads(
        (p.processed / "lm.json").read_text())
    assert not (p.model / "labels.json").exists()
    generation = GenerationConfig.from_pretrained(str(p.model))
    assert (generation.eos_token_id, generation.pad_token_id) == (0, 1)  # EOS, PAD: trained first

    saved = json.loads(p.train_metrics.read_text())
    assert saved == metrics and saved["monitor"] == "val_loss"
    assert saved["best_val_perplexity"] == pytest.approx(math.exp(saved["best_val_loss"]), rel=1e-4)
    assert saved["train_tokens_per_s"] > saved["train_samples_per_s"] > 0
    assert "best_val_accuracy" not in saved
    assert (p.train_plots / "val.csv").read_text().splitlines()[0] == "epoch,val_loss,val_perplexity"
    run = mlflow.MlflowClient(params.tracking.uri).get_run(json.loads(p.run_info.read_text())["run_id"])
    assert run.data.params["task"] == "causal_lm"
    assert run.data.params["model.scratch.hidden"] == "32"
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"train", "validation", "test"}
    # The logged MLflow model continues a prompt (plain text: no template around it).
    (output,) = run.outputs.model_outputs
    logged = mlflow.pyfunc.load_model(f"models:/{output.model_id}")
    assert logged.metadata.get_input_schema().input_names() == ["prompt"]
    out = logged.predict(pd.DataFrame({"prompt": ["the lamp", ""]}), params={"max_new_tokens": 80})
    assert list(out.columns) == ["text"] and out["text"].map(type).eq(str).all()  # 80 > context: cut


def test_lora_train_on_pairs_saves_the_merged_model(tmp_path, monkeypatch, tokenizer, texts,
                                                    pretrained_dir):
    from safetensors.torch import load_file

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = lm_params(tmp_path, source=str(pretrained_dir),
                       lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["c_attn"]})
    write_processed(params, texts, tokenizer, fmt="pairs")

    metrics = train.main(params)

    assert metrics["best_val_loss"] is not None and metrics["steps"] == 12  # 24 rows / 4, 2 epochs

    base, saved = (load_file(str(folder / "model.safetensors"))
                   for folder in (pretrained_dir, params.paths.model))
    assert saved.keys() == base.keys()  # merged: no lora_ weights, no peft prefixes
    attn = "transformer.h.0.attn.c_attn.weight"
    assert not torch.equal(base[attn], saved[attn])  # the adapters were folded in
    mlp = "transformer.h.0.mlp.c_fc.weight"
    assert torch.equal(base[mlp], saved[mlp])  # frozen
