"""Shared fixtures: offline, CPU-only, a tiny BERT built from a config, and a few dozen labelled rows."""

from __future__ import annotations

import os
import random
from contextlib import contextmanager

# Before any Hugging Face import: no test may reach the hub, and none needs a GPU.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["GX_ANALYTICS_ENABLED"] = "False"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["BENTOML_DO_NOT_TRACK"] = "True"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LABELS = ["negative", "neutral", "positive"]

_WORDS = {
    "positive": ["great", "love", "excellent", "perfect", "happy", "recommend", "sturdy", "fast"],
    "negative": ["awful", "broke", "hate", "refund", "slow", "cheap", "noisy", "returned"],
    "neutral": ["okay", "average", "fine", "arrived", "expected", "standard", "plain", "usual"],
}
_ITEMS = ["blender", "kettle", "lamp", "backpack", "mouse", "charger", "jacket", "novel"]


def make_rows(n_per_class: int = 12, seed: int = 0) -> pd.DataFrame:
    """Distinct short reviews whose words carry their label: a tiny model can learn them."""
    rng = random.Random(seed)
    rows = []
    for label, words in _WORDS.items():
        for i in range(n_per_class):
            w1, w2, *more = rng.sample(words, 2 + i % 3)  # lengths vary, as real text does
            text = " ".join([f"the {_ITEMS[i % len(_ITEMS)]} is {w1} and {w2}", *more, str(i)])
            rows.append({"text": text, "label": label})
    rng.shuffle(rows)
    return pd.DataFrame(rows)


@pytest.fixture
def rows() -> pd.DataFrame:
    return make_rows()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, hidden-32 BERT with a word-level vocab covering the test rows, saved like a hub model."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "is", "and"]
    vocab += [w for ws in _WORDS.values() for w in ws] + _ITEMS + [str(i) for i in range(100)]
    # transformers 5 takes the vocabulary itself (a vocab_file keyword is silently ignored).
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tokenizer.save_pretrained(str(folder))
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=64, num_labels=2,
    )
    torch.manual_seed(0)  # a fixed random init: tests that compare outputs see the same model
    BertForSequenceClassification(config).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """Byte-level BPE as prepare trains it from scratch (eos/bos <|endoftext|>, pad <|pad|>), on the
    texts and templated pairs of tests/helpers.py's make_texts and make_pairs."""
    from tests.helpers import TEMPLATE, make_pairs, make_texts, train_bpe

    corpus = make_texts() + [TEMPLATE.format(prompt=p["prompt"]) + p["response"] for p in make_pairs()]
    return train_bpe(corpus)


def tmp_paths(root: Path) -> dict[str, str]:
    """Every artifact path of the pipeline, moved under `root`."""
    from lmforge.params import Paths

    return {name: str(root / value) for name, value in Paths().model_dump().items()}


@pytest.fixture
def prepared_params(tmp_path, monkeypatch, rows, tiny_model_dir):
    """Params for a tiny run (tiny BERT, 36 rows, a few steps) with prepare already done in tmp_path.

    The working directory is tmp_path, and MLflow writes to a sqlite file there.
    """
    from lmforge.common import write_json
    from lmforge.params import parse_params
    from stages import prepare

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = parse_params({
        "paths": tmp_paths(tmp_path),
        "data": {"labels": ["negative", "neutral", "positive"]},
        "model": {"source": str(tiny_model_dir)},
        "prepare": {"max_length": 32},
        "train": {"batch_size": 8, "eval_batch_size": 16, "max_epochs": 2, "learning_rate": 1e-3,
                  "warmup_ratio": 0.0, "log_every_n_steps": 1, "accelerator": "cpu"},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    })
    params.paths.interim.mkdir(parents=True)
    for i, split in enumerate(("train", "validation", "test")):
        rows.iloc[i * 12 : (i + 1) * 12].to_parquet(params.paths.interim / f"{split}.parquet")
    write_json(params.paths.validation, {"success": True})
    prepare.main(params)
    return params


@contextmanager
def bentoml_home(home: Path):
    """Point BentoML at stores under `home`, in this process and in the processes it starts.

    BentoML caches its home and stores in singletons on first use, so the environment variable
    alone is not enough once any earlier test touched a store; the overrides are undone on exit.
    """
    from bentoml._internal.bento import BentoStore
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models import ModelStore

    for sub in ("bentos", "models", "tmp", "envs"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    overrides = {
        "bentoml_home": str(home), "bento_store_dir": str(home / "bentos"),
        "model_store_dir": str(home / "models"), "tmp_bento_store_dir": str(home / "tmp"),
        "env_store_dir": str(home / "envs"), "model_store": ModelStore(str(home / "models")),
        "bento_store": BentoStore(str(home / "bentos")), "tmp_bento_store": BentoStore(str(home / "tmp")),
    }
    old_env = os.environ.get("BENTOML_HOME")
    os.environ["BENTOML_HOME"] = str(home)
    for name, value in overrides.items():
        getattr(BentoMLContainer, name).set(value)
    try:
        yield home
    finally:
        for name in overrides:
            getattr(BentoMLContainer, name).reset()
        if old_env is None:
            os.environ.pop("BENTOML_HOME", None)
        else:
            os.environ["BENTOML_HOME"] = old_env


def write_trained_model(model_dir: Path, tiny_model_dir: Path, labels: list[str] = LABELS) -> None:
    """What train leaves in paths.model: the tiny BERT with a labelled head, tokenizer, labels.json."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lmforge.common import write_json

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(tiny_model_dir), num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)}, ignore_mismatched_sizes=True,
    )
    # An untrained head gives every text ~1/3 per class; sharper logits make texts distinguishable,
    # which the service tests need to see that each answer belongs to its own text.
    with torch.no_grad():
        model.classifier.weight.mul_(40)
    model.save_pretrained(str(model_dir))
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(str(model_dir))
    write_json(model_dir / "labels.json", {
        "id2label": {str(i): name for i, name in enumerate(labels)},
        "label2id": {name: i for i, name in enumerate(labels)},
    })


# --- servers started by tests: one registry, stopped even when pytest itself is killed -------------
#
# A server runs in a session of its own (start_new_session), so that one killpg stops it with the
# workers it forked; but then neither Ctrl+C nor a SIGTERM sent to pytest reaches it, and a pytest
# killed before its fixtures' teardown would leave it running. Every group started through
# start_process_group is registered until stop_process_group ends it; on SIGTERM, SIGINT or exit
# (pytest_configure installs the handlers, atexit the last resort) every registered group is stopped.

STARTED: dict[int, object] = {}  # process group id -> its leader's Popen
OWNER_PID = os.getpid()  # a process forked from pytest (no exec) inherits STARTED: not its groups
STOP_WAIT_S = 5  # on a signal: how long the groups get to exit on SIGTERM before SIGKILL


def start_process_group(cmd: list[str], **popen_kwargs):
    """``subprocess.Popen(cmd, **popen_kwargs)`` in a session of its own, registered so that it is
    stopped even if this pytest is killed (SIGTERM, SIGINT) before the test's teardown runs."""
    import subprocess

    proc = subprocess.Popen(cmd, start_new_session=True, **popen_kwargs)
    STARTED[proc.pid] = proc
    return proc


def stop_process_group(proc, timeout_s: float = 15) -> None:
    """Stop a server started with start_new_session=True, with the workers it forked."""
    import signal
    import subprocess

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
    except ProcessLookupError:  # the whole group is gone already (e.g. stopped on a signal)
        proc.wait(timeout=5)
    finally:
        STARTED.pop(proc.pid, None)


def stop_all_process_groups() -> None:
    """SIGTERM every registered group, then SIGKILL what is left after STOP_WAIT_S: safe to call
    from a signal handler (no logging, no locks), and more than once."""
    import signal
    import time

    if os.getpid() != OWNER_PID:
        return
    groups = list(STARTED.items())
    for pgid, _ in groups:
        try:
            os.killpg(pgid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + STOP_WAIT_S
    for pgid, proc in groups:
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            os.killpg(pgid, signal.SIGKILL)  # the leader's workers, even if the leader exited
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=2)  # reap the leader
        except Exception:  # noqa: BLE001 - a signal handler must not fail on the way out
            pass
        STARTED.pop(pgid, None)


def _stop_groups_then(previous):
    """A signal handler: stop every registered group, then do what ``previous`` did (SIGINT:
    KeyboardInterrupt, pytest's teardown and report; SIGTERM: die of the signal)."""
    import signal

    def handler(signum, frame):
        stop_all_process_groups()
        if callable(previous):
            return previous(signum, frame)
        if previous == signal.SIG_IGN:
            return None
        signal.signal(signum, signal.SIG_DFL)  # the default action: terminate with the signal
        os.kill(os.getpid(), signum)
        return None

    return handler


def pytest_configure(config) -> None:
    """Stop the registered server groups on SIGTERM, SIGINT and at exit (see STARTED)."""
    import atexit
    import signal
    import threading

    atexit.register(stop_all_process_groups)
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop_groups_then(signal.getsignal(signum)))
