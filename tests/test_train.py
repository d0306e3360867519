"""Train: pure helpers on in-memory data, then the stage itself on the tiny BERT (a few steps)."""

from __future__ import annotations

import csv
import json

import pandas as pd
import pytest
import torch

from lmforge.classification import model as clf_model
from lmforge.common import UserError, write_json
from lmforge.params import Params, Train
from lmforge.training import hardware, lit, resume
from stages import train


def _with_train(params: Params, **changes) -> Params:
    return params.model_copy(update={"train": params.train.model_copy(update=changes)})


def _csv(path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


# --- pure functions ------------------------------------------------------------------------------


def test_precision_auto_is_bf16_only_on_a_bf16_gpu():
    assert hardware.resolve_precision("auto", "auto", cuda=True, bf16=True) == "bf16-mixed"
    assert hardware.resolve_precision("auto", "gpu", cuda=True, bf16=False) == "32-true"
    assert hardware.resolve_precision("auto", "auto", cuda=False, bf16=False) == "32-true"
    assert hardware.resolve_precision("auto", "cpu", cuda=True, bf16=True) == "32-true"
    assert hardware.resolve_precision("16-mixed", "auto", cuda=False, bf16=False) == "16-mixed"


def test_length_grouped_sampler_yields_each_index_once_and_groups_lengths():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(3, 200) for _ in range(1000)]
    sampler = lit.EpochSampler(lengths, batch_size=10, seed=1)
    epochs = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(1000)) and len(sampler) == 1000
        epochs.append(order)
    assert epochs[0] != epochs[1]  # reshuffled every epoch
    torch.rand(3)  # the global RNG does not decide the order: a resumed epoch replays it
    sampler.set_epoch(0)
    assert list(sampler) == epochs[0]

    def mean_spread(order):  # average (longest - shortest) inside consecutive batches of 10
        batches = [[lengths[i] for i in order[k : k + 10]] for k in range(0, 1000, 10)]
        return sum(max(b) - min(b) for b in batches) / len(batches)

    shuffled = list(range(1000))
    rng.shuffle(shuffled)
    assert mean_spread(epochs[0]) < mean_spread(shuffled) / 5


def test_length_grouped_batches_mix_two_kinds_of_rows_through_the_epoch():
    """60 short rows of one task and 60 long of another, fewer than one mega-batch: the batches
    are pure (grouped) but the kinds alternate through the epoch instead of one half each."""
    lengths = [10] * 60 + [40] * 59 + [43] + [5, 5, 5]  # and a last batch of 3
    order = lit.length_grouped_order(lengths, batch_size=6, seed=0)
    assert sorted(order) == list(range(123))
    batches = [order[k : k + 6] for k in range(0, 120, 6)]
    kinds = ["short" if max(lengths[i] for i in b) == 10 else "long" for b in batches]
    assert kinds.count("short") == 10  # every batch holds one kind: grouping still works
    first_half = kinds[:10]
    assert 2 <= first_half.count("short") <= 8, kinds  # in order it would be all long, then short
    assert max(lengths[i] for i in batches[0]) == 43  # the longest batch first: OOM at step 1
    assert sorted(order[120:]) == [120, 121, 122]  # the short batch stays last


def test_plain_shuffle_is_also_fixed_by_seed_and_epoch():
    sampler = lit.EpochSampler([5] * 50, batch_size=4, seed=3, group=False)
    first = list(sampler)
    sampler.set_epoch(1)
    assert sorted(first) == list(range(50)) and list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_resumable_loader_skips_the_batches_handed_out_before_the_checkpoint():
    def loader():
        return resume.ResumableLoader(list(range(10)), batch_size=3)  # 4 batches: 3, 3, 3, 1

    first = loader()
    batches = iter(first)
    seen = [next(batches).tolist(), next(batches).tolist()]
    state = first.state_dict()
    assert state == {"batches_given": 2} and seen == [[0, 1, 2], [3, 4, 5]]

    resumed = loader()
    resumed.load_state_dict(state)
    assert [b.tolist() for b in resumed] == [[6, 7, 8], [9]]  # the rest of that epoch
    assert len(list(resumed)) == 4  # the skip is used once: the next epoch is whole

    whole = loader()
    list(whole)  # a checkpoint at the epoch's end: nothing to skip in the next one
    resumed.load_state_dict(whole.state_dict())
    assert len(list(resumed)) == 4


def test_resume_state_gives_back_the_loader_position_and_the_rng_states():
    from types import SimpleNamespace

    def trainer():
        return SimpleNamespace(train_dataloader=resume.ResumableLoader(list(range(10)), batch_size=3))

    keeper, before = resume.ResumeState(), trainer()
    keeper.on_train_start(before, None)
    batches = iter(before.train_dataloader)
    next(batches)
    torch.manual_seed(0)
    state = keeper.state_dict()  # what a checkpoint taken now holds
    expected_batch, expected_rng = next(batches).tolist(), torch.rand(4)

    restored, after = resume.ResumeState(), trainer()
    restored.load_state_dict(state)
    batches = iter(after.train_dataloader)  # Lightning makes the iterator before the restore
    restored.on_train_start(after, None)
    torch.rand(7)  # whatever the restore itself draws
    restored.on_train_batch_start(after, None, None, 0)
    assert next(batches).tolist() == expected_batch  # [3, 4, 5]: the first batch is skipped
    assert torch.equal(torch.rand(4), expected_rng)
    now = torch.get_rng_state()
    restored.on_train_batch_start(after, None, None, 1)  # once only
    assert torch.equal(torch.get_rng_state(), now)


def test_checkpoint_io_keeps_the_old_file_until_the_new_one_is_whole(tmp_path, monkeypatch):
    from lightning.fabric.plugins.io import torch_io

    path = tmp_path / "last.ckpt"
    io = resume.AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, path)

    def killed_while_writing(checkpoint, filepath):
        with open(filepath, "wb") as f:
            f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # stands in for SIGKILL

    monkeypatch.setattr(torch_io, "_atomic_save", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}


def test_pad_batch_pads_to_the_longest_row_and_drops_text():
    rows = [{"text": "a b", "labels": 1, "input_ids": [2, 7, 3], "attention_mask": [1, 1, 1]},
            {"text": "a", "labels": 0, "input_ids": [2, 3], "attention_mask": [1, 1]}]
    batch = lit.pad_batch(rows, pad_id=0)
    assert set(batch) == {"labels", "input_ids", "attention_mask"}
    assert batch["input_ids"].tolist() == [[2, 7, 3], [2, 3, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [1, 0]


def test_no_weight_decay_on_biases_and_layernorm():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = lit.param_groups(net, 0.1)
    assert [p.shape for p in decay["params"]] == [(4, 4)] and decay["weight_decay"] == 0.1
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_schedule_warms_up_then_follows_its_shape(schedule):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = lit.make_scheduler(opt, Train(schedule=schedule, warmup_ratio=0.1), total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[10] == pytest.approx(1.0)  # 10 warmup steps
    end = pytest.approx(1.0) if schedule == "constant" else pytest.approx(0.0, abs=0.02)
    assert lrs[99] == end


def test_should_resume_only_unfinished_runs_or_more_epochs():
    budget = {"max_epochs": 3, "max_steps": -1}
    assert not resume.should_resume(None, "fp", budget)[0]
    assert not resume.should_resume({"fingerprint": "old", "finished": False}, "fp", budget)[0]
    assert resume.should_resume({"fingerprint": "fp", "finished": False}, "fp", budget)[0]
    done = {"fingerprint": "fp", "finished": True, "budget": budget}
    assert not resume.should_resume(done, "fp", budget)[0]  # same budget: retrain from scratch
    assert resume.should_resume(done, "fp", {**budget, "max_epochs": 5})[0]
    assert not resume.should_resume(done, "fp", {**budget, "max_epochs": 2})[0]
    # A step cap may have stopped mid-epoch, and last.ckpt would count that epoch as done.
    capped = {**done, "budget": {"max_epochs": 3, "max_steps": 10}}
    assert not resume.should_resume(capped, "fp", {"max_epochs": 5, "max_steps": -1})[0]


def test_a_truncated_last_checkpoint_is_cleared_not_resumed(tmp_path, capsys):
    budget = {"max_epochs": 3, "max_steps": -1}
    (tmp_path / "last.ckpt").write_bytes(b"PK\x03\x04 cut off")
    (tmp_path / resume.STATE_FILE).write_text(json.dumps({"fingerprint": "fp", "finished": False}))
    assert resume.checkpoint_to_resume(tmp_path, "fp", budget) is None
    assert "truncated" in capsys.readouterr().out and not (tmp_path / "last.ckpt").exists()


def test_fingerprint_ignores_the_budget_but_not_the_learning_rate():
    base = Params()
    fp = resume.fingerprint(base, "data", "code")
    assert resume.fingerprint(_with_train(base, max_epochs=9), "data", "code") == fp
    assert resume.fingerprint(_with_train(base, checkpoint_every_n_steps=7), "data", "code") == fp
    assert resume.fingerprint(_with_train(base, learning_rate=1e-3), "data", "code") != fp
    assert resume.fingerprint(base, "other data", "code") != fp


# --- the stage -----------------------------------------------------------------------------------


def test_unknown_model_source_is_a_user_error(prepared_params, tmp_path):
    with pytest.raises(UserError, match="model.source 'no-such/model'"):
        clf_model.load_pretrained("no-such/model", {"id2label": {"0": "a", "1": "b"},
                                           "label2id": {"a": 0, "b": 1}})
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="cannot load a classification model"):
        clf_model.load_pretrained(str(tmp_path / "empty"), {"id2label": {"0": "a"}, "label2id": {"a": 0}})


def test_model_loads_with_our_labels_in_training_mode(tiny_model_dir):
    # The saved tiny model has a 2-label head; ours needs 3 (ignore_mismatched_sizes).
    mapping = {"id2label": {"0": "a", "1": "b", "2": "c"}, "label2id": {"a": 0, "b": 1, "c": 2}}
    module = clf_model.ClassifierModule(clf_model.load_pretrained(str(tiny_model_dir), mapping), Train())
    assert module.model.config.id2label == {0: "a", 1: "b", 2: "c"}
    assert module.model.classifier.out_features == 3
    assert module.model.training  # from_pretrained leaves eval mode: dropout would be off


def test_training_changes_weights_and_writes_every_output(prepared_params):
    import mlflow
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    p = prepared_params.paths
    write_json(p.manifest, {"source_sha256": "ab" * 32})  # ingest's: the datasets' digest
    labels = json.loads((p.processed / "labels.json").read_text())
    torch.manual_seed(prepared_params.train.seed)  # main() seeds the same way before loading
    before = clf_model.load_pretrained(prepared_params.model.source, labels).state_dict()

    metrics = train.main(prepared_params)

    model = AutoModelForSequenceClassification.from_pretrained(str(p.model))
    key = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(before[key], model.state_dict()[key])
    assert model.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert AutoTokenizer.from_pretrained(str(p.model))("the lamp is great")["input_ids"]
    assert json.loads((p.model / "labels.json").read_text()) == labels
    (best_ckpt,) = p.checkpoints.glob("best-*.ckpt")  # the exported weights are the best epoch's
    best_state = torch.load(best_ckpt, weights_only=True)["state_dict"]
    assert torch.equal(best_state[f"model.{key}"], model.state_dict()[key])
    assert (p.checkpoints / "last.ckpt").exists()

    saved = json.loads(p.train_metrics.read_text())
    assert saved == metrics
    assert {"best_epoch", "best_val_loss", "best_val_accuracy", "best_val_f1_macro", "epochs",
            "steps", "train_samples_per_s", "wall_s"} <= set(saved)
    assert saved["train_samples_per_s"] > 0
    assert saved["epochs"] == 2 and saved["steps"] == 4  # 12 rows / batch 8 = 2 steps per epoch
    assert [int(r["step"]) for r in _csv(p.train_plots / "loss.csv")] == [0, 1, 2, 3]
    val = _csv(p.train_plots / "val.csv")
    assert [int(r["epoch"]) for r in val] == [0, 1]
    assert 0 <= float(val[-1]["val_accuracy"]) <= 1
    best = max(val, key=lambda r: float(r["val_accuracy"]))  # the first best (monitor: accuracy)
    assert saved["best_epoch"] == int(best["epoch"])
    assert saved["best_val_accuracy"] == pytest.approx(float(best["val_accuracy"]), abs=1e-6)

    run_id = json.loads(p.run_info.read_text())["run_id"]
    client = mlflow.MlflowClient(prepared_params.tracking.uri)
    run = client.get_run(run_id)
    assert run.data.params["train.learning_rate"] == "0.001"
    tags = run.data.tags
    assert {"mlflow.source.git.commit", "git.dirty", "data.sha256"} <= set(tags)
    assert not {"git.commit", "git.branch"} & set(tags)  # MLflow's source tags, not a second set
    history = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in history] == [0, 1, 2, 3]  # log_every_n_steps=1: every step
    assert {"val/loss", "val/accuracy", "val/f1_macro", "train/epoch"} <= set(run.data.metrics)
    # The summary: the saved model's scores as metrics, how the run went as tags.
    assert run.data.metrics["val/best_accuracy"] == pytest.approx(saved["best_val_accuracy"])
    assert tags["train.epochs"] == "2" and tags["train.steps"] == "4"
    assert not {"epochs", "steps", "wall_s", "train_loss"} & set(run.data.metrics)
    assert len(client.search_runs([run.info.experiment_id])) == 1  # the logger made no second run
    assert {a.path for a in client.list_artifacts(run_id)} == {"plots"}

    # The splits are the run's datasets; the model is an MLflow model logged into the run.
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "validation", "test"}
    assert {d.dataset.digest for d in inputs.values()} == {("ab" * 32)[:36]}
    assert json.loads(inputs["train"].dataset.source) == {"uri": prepared_params.data.source}
    assert json.loads(inputs["test"].dataset.profile)["num_rows"] == 12
    (output,) = run.outputs.model_outputs
    info = mlflow.models.get_model_info(f"models:/{output.model_id}")
    assert info.signature.inputs.input_names() == ["text"]
    assert info.signature.outputs.input_names() == ["label", "score"]
    assert info.saved_input_example_info is not None
    texts = ["the lamp is great and excellent", "awful and broke"]
    predicted = mlflow.pyfunc.load_model(f"models:/{output.model_id}").predict(
        pd.DataFrame({"text": texts}))
    assert list(predicted.columns) == ["label", "score"] and len(predicted) == 2
    assert set(predicted["label"]) <= {"negative", "neutral", "positive"}
    assert ((predicted["score"] > 1 / 3) & (predicted["score"] <= 1)).all()


def test_a_log_file_shows_a_line_per_step_and_per_epoch(prepared_params, capsys):
    import sys

    assert not sys.stdout.isatty()  # captured, as in a log file: Progress, not a progress bar
    train.main(_with_train(prepared_params, progress_every_n_steps=1))
    lines = [line for line in capsys.readouterr().out.splitlines()
             if line.startswith("train: epoch")]
    steps = [line for line in lines if ", loss " in line]
    epochs = [line for line in lines if "epoch done" in line]
    assert [line.split(", ")[1] for line in steps] == [f"step {i}/4" for i in (1, 2, 3, 4)]
    assert len(epochs) == 2 and epochs[0].startswith("train: epoch 1/2, step 2/4, epoch done")
    assert "val_accuracy" in epochs[1] and epochs[1].endswith(" s")


def test_resume_continues_from_last_checkpoint_and_params_change_clears(prepared_params, capsys):
    import mlflow

    p = prepared_params.paths
    # Step checkpoints too: the epoch-end save must still land in last.ckpt, not last-v1.ckpt.
    first = _with_train(prepared_params, max_epochs=1, checkpoint_every_n_steps=1)
    train.main(first)
    assert [f.name for f in p.checkpoints.glob("last*.ckpt")] == ["last.ckpt"]

    resumed = train.main(_with_train(prepared_params, max_epochs=2, checkpoint_every_n_steps=1))
    assert "resuming from" in capsys.readouterr().out
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == 4
    # The curves keep the first run's rows (they travel in the checkpoint).
    assert [int(r["step"]) for r in _csv(p.train_plots / "loss.csv")] == [0, 1, 2, 3]
    run_id = json.loads(p.run_info.read_text())["run_id"]
    steps = [m.step for m in mlflow.MlflowClient(prepared_params.tracking.uri)
             .get_metric_history(run_id, "train/loss")]
    assert steps == [2, 3]  # the second run trained only the new steps

    changed = train.main(_with_train(prepared_params, max_epochs=2, learning_rate=5e-4))
    assert "clearing" in capsys.readouterr().out
    assert changed["resumed_from_step"] == 0 and changed["steps"] == 4


@pytest.mark.parametrize(("hook", "at_step"), [
    ("training_step", 3),  # mid-epoch: step 3 is epoch 1's first batch, its last.ckpt mid-epoch
    ("validation_step", 2),  # after epoch 0's last batch: that validation must still run
])
def test_a_crash_resumes_to_the_same_model_as_an_uninterrupted_run(
        prepared_params, monkeypatch, capsys, hook, at_step):
    p = prepared_params.paths
    params = _with_train(prepared_params, checkpoint_every_n_steps=1)
    train.main(params)
    expected = [(p.model / "model.safetensors").read_bytes(),
                _csv(p.train_plots / "loss.csv"), _csv(p.train_plots / "val.csv")]

    real = getattr(clf_model.ClassifierModule, hook)

    def crash(self, batch, batch_idx):
        if self.trainer.global_step == at_step and not self.trainer.sanity_checking:
            raise RuntimeError("simulated crash")
        return real(self, batch, batch_idx)

    monkeypatch.setattr(clf_model.ClassifierModule, hook, crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.main(params)  # its finished state is stale: it starts over, then crashes
    monkeypatch.undo()
    last = torch.load(p.checkpoints / "last.ckpt", weights_only=False)
    # Checkpoints every step, but none at an epoch's last batch (step 2): step 1 holds before it.
    assert last["global_step"] == {3: 3, 2: 1}[at_step]

    resumed = train.main(params)
    assert "resuming from" in capsys.readouterr().out
    assert resumed["resumed_from_step"] == last["global_step"] and resumed["steps"] == 4
    assert [(p.model / "model.safetensors").read_bytes(), _csv(p.train_plots / "loss.csv"),
            _csv(p.train_plots / "val.csv")] == expected


def test_max_steps_inside_the_first_epoch_still_saves_a_model(prepared_params):
    metrics = train.main(_with_train(prepared_params, max_steps=1, group_by_length=True))
    assert metrics["steps"] == 1 and metrics["best_val_accuracy"] is None  # no validation ran
    assert (prepared_params.paths.model / "model.safetensors").exists()
    assert _csv(prepared_params.paths.train_plots / "val.csv") == []
