"""Stage export: ONNX parity with PyTorch on a tiny BERT and a tiny GPT-2, drops beyond tolerance,
the disabled path, and missing inputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from lmforge import common
from lmforge.causal_lm import evaluate as evaluate_lm
from lmforge.classification import evaluate as clf_eval
from lmforge.common import UserError, write_json
from lmforge.metrics import load_metric
from lmforge.params import Export, Tolerance, parse_params
from stages import export
from tests.conftest import LABELS, REPO, tmp_paths, write_trained_model
from tests.helpers import (
    encode_pair,
    make_pairs,
    make_texts,
    pack_blocks,
    tiny_gpt2,
    write_model,
    write_processed,
)

QUICK = {"latency_repeats": 2}  # latency figures are checked for presence, not precision
METRIC_KEYS = {"size_mb", "latency_ms_batch1", "latency_ms_batch32"}


def with_export(params, **cfg):
    return params.model_copy(update={"export": Export(**{**QUICK, **cfg})})


@pytest.fixture
def classifier_params(prepared_params, tiny_model_dir):
    """The tiny BERT in paths.model, a test split relabelled with its own predictions (so PyTorch
    is right on every row and any changed prediction is a drop), and evaluate's eval.json."""
    from datasets import Dataset, DatasetDict, load_from_disk

    paths = prepared_params.paths
    write_trained_model(paths.model, tiny_model_dir)
    model, tokenizer = clf_eval.load_trained(paths.model)
    folder = paths.processed / "datasets"
    splits = {name: split.to_list() for name, split in load_from_disk(str(folder)).items()}
    preds = clf_eval.predict_logits(model, tokenizer, splits["test"], 8).argmax(axis=1)
    for row, pred in zip(splits["test"], preds, strict=True):
        row["labels"] = int(pred)
    shutil.rmtree(folder)
    DatasetDict({k: Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(folder))
    write_json(paths.eval_metrics, common.rounded(
        clf_eval.compute_metrics(preds, preds, LABELS)))
    return with_export(prepared_params)


def test_classifier_onnx_matches_pytorch_and_the_folder_serves_alone(classifier_params, tmp_path):
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    paths = classifier_params.paths
    report = export.main(classifier_params)

    assert json.loads(paths.export_report.read_text()) == report
    assert report["enabled"] and report["passed"] and report["failures"] == []
    assert report["task"] == "classification" and report["rows"] == 12
    assert report["torch"]["accuracy"] == 1.0  # the relabelled split: PyTorch right on every row
    assert set(report["torch"]) == {"accuracy", "f1_macro"} | METRIC_KEYS
    for runtime in ("onnx", "onnx_int8"):
        assert set(report[runtime]) == ({"accuracy", "f1_macro", "delta", "agreement",
                                         "max_abs_logit_diff"} | METRIC_KEYS)
        assert all(report[runtime][k] > 0 for k in METRIC_KEYS)
    onnx = report["onnx"]
    assert onnx["agreement"] == 1.0 and onnx["max_abs_logit_diff"] < 1e-4
    assert onnx["delta"] == {"accuracy": 0.0, "f1_macro": 0.0}
    assert report["onnx_int8"]["size_mb"] < onnx["size_mb"]

    manifest = json.loads((paths.export / "export.json").read_text())
    assert manifest == {"enabled": True, "task": "classification", "opset": 18,
                        "inputs": ["input_ids", "attention_mask", "token_type_ids"],
                        "output": "logits", "files": {"onnx": "model.onnx",
                                                      "onnx_int8": "model.int8.onnx"},
                        "max_length": 32}
    names = {p.name for p in paths.export.iterdir()}
    assert {"model.onnx", "model.int8.onnx", "config.json", "labels.json", "tokenizer.json"} <= names
    assert not any(n.endswith((".safetensors", ".bin")) for n in names)
    assert [p.name for p in paths.export.parent.iterdir() if p.name.startswith(".")] == []

    # A copy of the folder alone (tokenizer, graph) reproduces the PyTorch model's logits.
    alone = shutil.copytree(paths.export, tmp_path / "elsewhere")
    texts = ["the lamp is great and fast", "the kettle is awful", "okay"]
    feed = AutoTokenizer.from_pretrained(str(alone))(texts, padding=True, return_tensors="np")
    session = ort.InferenceSession(str(alone / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {k: feed[k].astype(np.int64) for k in manifest["inputs"]})[0]
    model = AutoModelForSequenceClassification.from_pretrained(str(paths.model)).eval()
    with torch.inference_mode():
        want = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_judge_drops_names_runtime_metric_drop_and_tolerance(tmp_path):
    tolerances = {"accuracy": Tolerance(direction="higher", abs=0.01),
                  "perplexity": Tolerance(direction="lower", rel=0.05)}
    report = {"torch": {"accuracy": 0.9, "perplexity": 10.0},
              "onnx": {"accuracy": 0.891, "perplexity": 10.4},  # within both tolerances
              "onnx_int8": {"accuracy": 0.85, "perplexity": 10.6}}
    failures = export.judge_drops(report, tolerances, tmp_path)
    assert failures == [
        f"onnx_int8 ({tmp_path / 'model.int8.onnx'}): accuracy 0.9 -> 0.85 (-0.05) is beyond the "
        "tolerance -0.01 (export.tolerances.accuracy)",
        f"onnx_int8 ({tmp_path / 'model.int8.onnx'}): perplexity 10 -> 10.6 (+0.6) is beyond the "
        "tolerance +0.5 (5%) (export.tolerances.perplexity)",
    ]
    report["onnx_int8"] = {"accuracy": 0.95, "perplexity": 9.0}  # better is never a drop
    del report["onnx"]  # quantize only: no fp32 entry to judge
    assert export.judge_drops(report, tolerances, tmp_path) == []


def test_drop_beyond_tolerance_fails_after_writing_the_report(classifier_params, monkeypatch):
    import torch

    real = export.logits_only

    def rolled(model, causal):  # a broken export: every class's logit moved to the next class
        inner = real(model, causal)

        class Rolled(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = inner

            def forward(self, input_ids, attention_mask, token_type_ids):
                return torch.roll(self.inner(input_ids, attention_mask, token_type_ids), 1, dims=-1)

        return Rolled().eval()

    monkeypatch.setattr(export, "logits_only", rolled)
    paths = classifier_params.paths
    write_json(paths.export / "export.json", {"previous": True})

    with pytest.raises(UserError, match=r"4 drop\(s\) beyond export.tolerances") as err:
        export.main(classifier_params)
    assert "onnx (" in str(err.value) and "onnx_int8 (" in str(err.value)
    assert "accuracy 1 -> 0 (-1) is beyond the tolerance -0.01 (export.tolerances.accuracy)" in \
        str(err.value)
    report = json.loads(paths.export_report.read_text())
    assert report["passed"] is False and len(report["failures"]) == 4
    assert report["onnx"]["agreement"] == 0.0 and report["onnx"]["delta"]["accuracy"] == -1.0
    # The failed export did not replace the previous one, and left no staging folder behind.
    assert json.loads((paths.export / "export.json").read_text()) == {"previous": True}
    assert [p.name for p in paths.export.parent.iterdir() if p.name.startswith(".")] == []


def test_model_changed_since_evaluate_is_refused(classifier_params):
    write_json(classifier_params.paths.eval_metrics, {"accuracy": 0.5, "f1_macro": 0.4})
    with pytest.raises(UserError, match=r"accuracy: the PyTorch model scores 1 .* says 0.5: the "
                       r"test split or the model changed since evaluate"):
        export.main(classifier_params)
    assert not classifier_params.paths.export_report.exists()


def test_disabled_records_it_without_importing_torch(tmp_path):
    raw = {"paths": tmp_paths(tmp_path), "export": {"enabled": False}}
    params = parse_params(raw)
    (params.paths.export).mkdir(parents=True)
    (params.paths.export / "model.onnx").write_text("stale")
    script = ("import json, sys\nfrom stages import export\nfrom lmforge.params import parse_params\n"
              "export.main(parse_params(json.loads(sys.argv[1])))\n"
              "print(json.dumps([m for m in ('torch', 'transformers', 'onnxruntime') "
              "if m in sys.modules]))")
    run = subprocess.run([sys.executable, "-c", script, json.dumps(raw)], cwd=REPO, text=True,
                         capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.splitlines()[-1]) == []  # nothing heavy was imported
    assert [p.name for p in params.paths.export.iterdir()] == ["export.json"]
    assert json.loads((params.paths.export / "export.json").read_text()) == {
        "enabled": False, "reason": "export.enabled is false in params"}
    assert json.loads(params.paths.export_report.read_text()) == {"enabled": False}


def test_missing_model_and_test_split_name_the_stage_to_run(tmp_path):
    params = parse_params({"paths": tmp_paths(tmp_path)})
    with pytest.raises(UserError, match=rf"{params.paths.model}: no trained model .*dvc repro train"):
        export.main(params)
    params.paths.model.mkdir(parents=True)
    (params.paths.model / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"datasets/test: no processed test split: run `dvc repro "
                       r"prepare`"):
        export.main(params)
    assert not params.paths.export_report.exists() and not params.paths.export.exists()


def lm_params(tmp_path, pairs: bool):
    raw = {"task": "causal_lm", "paths": tmp_paths(tmp_path),
           "train": {"early_stopping": {"monitor": "val_loss", "mode": "min"}},
           "gate": {"floors": {"perplexity": {"max": 1e9}},
                    "tolerances": {"perplexity": {"direction": "lower", "rel": 0.1}}},
           "export": {"tolerances": {"perplexity": {"direction": "lower", "rel": 0.05}}, **QUICK}}
    if pairs:
        raw["data"] = {"prompt_column": "prompt", "response_column": "response"}
    return parse_params(raw)


@pytest.mark.parametrize("pairs", [False, True], ids=["text", "pairs"])
def test_causal_lm_perplexity_matches_pytorch(tmp_path, bpe_tokenizer, pairs):
    tokenizer = bpe_tokenizer
    params = lm_params(tmp_path, pairs)
    rows = ([encode_pair(tokenizer, r) for r in make_pairs(10)] if pairs
            else pack_blocks(tokenizer, make_texts(10), block=32))
    model = tiny_gpt2(tokenizer)
    write_model(params, model, tokenizer, pairs)
    write_processed(params, tokenizer, {"test": rows})
    nll, tokens = evaluate_lm.sequence_nll(model, rows, 4, tokenizer.pad_token_id)
    ppl = load_metric("perplexity").compute(nll=nll.tolist(), tokens=tokens.tolist())["perplexity"]
    write_json(params.paths.eval_metrics, {"perplexity": round(ppl, 6)})

    report = export.main(params)

    assert report["passed"] and report["task"] == "causal_lm" and report["rows"] == len(rows)
    assert report["torch"]["perplexity"] == pytest.approx(ppl, rel=1e-6)
    for runtime in ("onnx", "onnx_int8"):
        assert set(report[runtime]) == {"perplexity", "delta", "max_abs_logit_diff"} | METRIC_KEYS
    assert report["onnx"]["perplexity"] == pytest.approx(ppl, rel=1e-5)
    assert report["onnx"]["max_abs_logit_diff"] < 1e-4
    assert abs(report["onnx_int8"]["delta"]["perplexity"]) <= 0.05 * ppl
    manifest = json.loads((params.paths.export / "export.json").read_text())
    assert manifest["inputs"] == ["input_ids", "attention_mask"] and "max_length" not in manifest
    names = {p.name for p in params.paths.export.iterdir()}
    assert {"model.onnx", "model.int8.onnx", "lm.json", "tokenizer.json", "config.json"} <= names
    assert not any(n.endswith(".safetensors") for n in names)
