"""Plain helpers shared by several test modules: servers and ports, repo copies driven by git and dvc,
the fake upstream outputs of package, the tiny causal LM and its data, and the HTTP service checks.

Test modules import shared things from here or from tests/conftest.py (fixtures, make_rows, REPO, ...),
never from one another: tests/test_layout.py checks it. Heavy libraries are imported inside the
functions that need them, so importing this module stays cheap.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from lmforge.common import write_json
from lmforge.params import Params, parse_params
from tests.conftest import (
    REPO,
    bentoml_home,
    make_rows,
    start_process_group,
    stop_process_group,
    tmp_paths,
)

# --- servers started by a test --------------------------------------------------------------------

STARTUP_TIMEOUT_S = 90  # ~12 s for an MLflow server on an idle 2-core machine; shared CI machines are slower


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None = None, log: Path | None = None,
                 timeout_s: float = STARTUP_TIMEOUT_S, what: str = "server") -> float:
    """Seconds until a GET of ``url`` answers 2xx. Fails the test when ``timeout_s`` runs out or, given
    the server's ``proc``, as soon as it exits; the failure shows the tail of ``log`` when given."""

    def tail() -> str:
        return f":\n{log.read_text()[-3000:]}" if log is not None else ""

    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}{tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return time.monotonic() - started
        except OSError:  # refused, reset, timed out, or an HTTP error status
            pass
        time.sleep(0.25)
    pytest.fail(f"{what} not answering {url} after {timeout_s} s{tail()}")


# --- a repo copy, git and dvc ---------------------------------------------------------------------

def git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo,
                          capture_output=True, text=True, check=True)
    return done.stdout.strip()


def git_commit(folder: Path) -> str:
    """Make `folder` a git repository with one (empty) commit; return its hash."""
    git(folder, "init", "-q")
    git(folder, "commit", "-q", "--allow-empty", "-m", "c")
    return git(folder, "rev-parse", "HEAD")


def copy_repo(dest: Path) -> Path:
    """Copy what git would clone (tracked + untracked-not-ignored files) and make it a git repo."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split("\0")
    for rel in filter(None, files):
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    git(dest, "init", "-q")
    git(dest, "add", "-A")
    git(dest, "commit", "-qm", "copy")
    return dest


def dvc(repo: Path, *args: str, **env_vars: str) -> subprocess.CompletedProcess:
    # Stage commands run `python -m stages.x`: put this interpreter's bin first on PATH.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    env = {**os.environ, "PATH": path, **env_vars}
    env.pop("MLFLOW_TRACKING_URI", None)  # the default store: sqlite:///mlflow.db in the repo
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True
    )


def dvc_ok(repo: Path, *args: str) -> str:
    run = dvc(repo, *args)
    assert run.returncode == 0, f"dvc {' '.join(args)}:\n{run.stderr[-3000:]}"
    return run.stdout


def set_params(repo: Path, **sections: dict) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for name, values in sections.items():
        params[name].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def tiny_repo(dest: Path, tiny_model_dir: Path, n_per_class: int = 12, seed: int = 3,
              export: bool = False, **train) -> Path:
    """A copy of the repo on tiny params: the tiny BERT, a make_rows CSV, a few steps, floors off,
    stage export off unless asked for (it adds ~10 s to every full repro)."""
    repo = copy_repo(dest)
    make_rows(n_per_class=n_per_class, seed=seed).to_csv(repo / "data/tiny.csv", index=False)
    set_params(
        repo,
        model={"source": str(tiny_model_dir)},
        prepare={"max_length": 32},
        data={"source": "data/tiny.csv", "split": {"validation": 0.25, "test": 0.25}},
        train={"batch_size": 8, "max_epochs": 1, "learning_rate": 1e-3, "log_every_n_steps": 1,
               **train},
        gate={"floors": {"accuracy": {"min": 0.0}}},  # a tiny model on few rows: any score passes
        # int8 may flip a near-tie of the tiny model on its 9 test rows (0.11 each): the stage's
        # tolerance checks are tests/test_export.py's; here it must run end to end.
        export={"enabled": export, "tolerances": {"accuracy": {"direction": "higher", "abs": 0.5}}},
    )
    return repo


def checkpointed_repo(dest: Path, tiny_model_dir: Path) -> Path:
    """A copy of the repo on the tiny model and 120 rows: 15 optimizer steps per epoch, 2 epochs,
    a checkpoint every 2 steps (tests/test_resume.py, tests/test_determinism.py)."""
    return tiny_repo(dest, tiny_model_dir, n_per_class=40, seed=5, batch_size=4, max_epochs=2,
                     learning_rate=5e-3, checkpoint_every_n_steps=2)


# --- DVC experiments and their MLflow runs --------------------------------------------------------

def experiments(repo: Path) -> dict[str, dict]:
    """Name -> the data (params, metrics) of every experiment `dvc exp show` lists."""
    show = json.loads(dvc_ok(repo, "exp", "show", "--json"))
    return {exp["name"]: exp["revs"][0]["data"]
            for base in show for exp in base.get("experiments") or []}


def learning_rate(data: dict) -> float:
    return data["params"]["params.yaml"]["data"]["train"]["learning_rate"]


def mlflow_client(repo: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")  # the repo root's store, the default


def wait_for_queue(repo: Path, timeout_s: float) -> str:
    """`dvc queue status` once nothing is queued or running; fails the test after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = dvc_ok(repo, "queue", "status")
        if not re.search(r"\b(Queued|Running)\b", status):
            return status
        if time.monotonic() > deadline:
            pytest.fail(f"the experiment queue is not done after {timeout_s} s:\n{status}")
        time.sleep(5)


# --- what package reads: fake upstream outputs, a tiny trained causal LM --------------------------

RUN_ID = "0123456789abcdef"
DATA_SHA = "ab" * 32
CLASSIFIER_METRICS = {"accuracy": 0.875, "f1_macro": 0.8611}
LM_METRICS = {"perplexity": 123.456, "perplexity_start": 301.2, "loss": 4.8158, "tokens": 900,
              "n": 12, "bleu": 3.5, "rouge1": 0.2, "rouge2": 0.05, "rougeL": 0.1875, "generated": 12}
TEMPLATE = "### Prompt:\n{prompt}\n### Response:\n"
EOS, PAD = "<|endoftext|>", "<|pad|>"
LM_TEXTS = [
    "the kettle boils water fast", "a lamp lights the room at night", "the mouse clicks and scrolls",
    "### Prompt:\nname a fruit\n### Response:\nan apple", "the jacket keeps the rain out",
    "### Prompt:\nsay hi\n### Response:\nhello there", "my novel has seven short chapters",
]


def write_upstream(params, metrics: dict = CLASSIFIER_METRICS) -> None:
    """The other inputs of package: run info, eval metrics, data manifest, validation verdict."""
    write_json(params.paths.run_info, {"run_id": RUN_ID, "experiment_id": "1",
                                       "tracking_uri": "sqlite:///mlflow.db"})
    write_json(params.paths.eval_metrics, metrics)
    write_json(params.paths.manifest, {"source_sha256": DATA_SHA})
    write_json(params.paths.validation, {"success": True, "checks_failed": 0})


def lm_params(root: Path, pairs: bool = True, **sections) -> Params:
    """causal_lm params of a tiny run under ``root`` (the contract's minimal dict)."""
    raw = {
        "task": "causal_lm", "paths": tmp_paths(root),
        "model": {"source": "scratch", "scratch": {"layers": 2, "heads": 2, "hidden": 32,
                                                   "context": 64, "vocab_size": 300}},
        "prepare": {"block_size": 32, "max_length": 64, "template": TEMPLATE},
        "train": {"early_stopping": {"monitor": "val_loss", "mode": "min", "patience": 2}},
        "evaluate": {"generation": {"max_new_tokens": 16}},  # room for a prompt in 64 positions
        "gate": {"floors": {"perplexity": {"max": 1e9}},
                 "tolerances": {"perplexity": {"direction": "lower", "rel": 0.1}}},
        "package": {"model_name": "lmforge-lm"},
        **({"data": {"prompt_column": "prompt", "response_column": "response"}} if pairs else {}),
    }
    return parse_params({**raw, **sections})


def train_bpe(corpus: list[str]):
    """Byte-level BPE trained on ``corpus`` as prepare trains it from scratch: 300 tokens,
    eos/bos <|endoftext|>, pad <|pad|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, min_frequency=1, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, pad_token=PAD)


def write_trained_lm(model_dir: Path, fmt: str = "pairs", context: int = 64) -> None:
    """What train leaves in paths.model for causal_lm: a 2-layer GPT-2 (safetensors,
    generation_config.json), a byte-level BPE tokenizer trained on LM_TEXTS, lm.json."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = train_bpe(LM_TEXTS)
    tokenizer.save_pretrained(str(model_dir))
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=context, n_embd=32, n_layer=2,
                        n_head=2, bos_token_id=eos, eos_token_id=eos, pad_token_id=pad)
    torch.manual_seed(0)  # a fixed random init: greedy generation is the same in every run
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        # The output embedding is tied to the input one: a zero row gives EOS and PAD logit 0,
        # below the best of ~300 random logits, so greedy text runs to max_new_tokens.
        model.transformer.wte.weight[[eos, pad]] = 0
    model.save_pretrained(str(model_dir))
    write_json(model_dir / "lm.json", {
        "task": "causal_lm", "format": fmt, "template": TEMPLATE if fmt == "pairs" else None,
        "block_size": 32, "max_length": 64, "eos_token_id": eos, "pad_token_id": pad})


# --- causal LM data and a tiny GPT-2 for the stages (the bpe_tokenizer fixture is in conftest) ----

COLORS = ["red", "green", "blue", "yellow", "black", "white"]
ITEMS = ["kettle", "lamp", "mouse", "jacket", "novel", "charger", "blender", "backpack"]


def make_pairs(n: int = 24) -> list[dict]:
    return [{"prompt": f"what color is the {ITEMS[i % 8]} number {i}?",
             "response": f"the {ITEMS[i % 8]} is {COLORS[i % 6]}"} for i in range(n)]


def make_texts(n: int = 24) -> list[str]:
    return [f"the {ITEMS[i % 8]} is {COLORS[i % 6]} and the {ITEMS[(i + 3) % 8]} is "
            f"{COLORS[(i + 1) % 6]}, said story {i}." for i in range(n)]


def tiny_gpt2(tokenizer, seed: int = 0, context: int = 64):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=context, n_embd=32, n_layer=2,
                        n_head=2, eos_token_id=tokenizer.eos_token_id,
                        bos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return GPT2LMHeadModel(config).eval()


def encode_pair(tokenizer, row: dict) -> dict:
    """prepare's pair row: template + prompt masked with -100, response + EOS counted."""
    from lmforge.causal_lm import model as lm

    prompt = tokenizer(TEMPLATE.format(prompt=row["prompt"]), add_special_tokens=False)["input_ids"]
    response = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
    response += [tokenizer.eos_token_id]
    return {"input_ids": prompt + response, "labels": [lm.IGNORE] * len(prompt) + response, **row}


def pack_blocks(tokenizer, texts: list[str], block: int) -> list[dict]:
    """prepare's plain-text rows: documents + EOS concatenated, cut into blocks (last one partial)."""
    ids = [t for text in texts
           for t in tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    return [{"input_ids": ids[i : i + block], "labels": ids[i : i + block]}
            for i in range(0, len(ids), block)]


def write_processed(params, tokenizer, splits: dict[str, list[dict]]) -> None:
    from datasets import Dataset, DatasetDict

    DatasetDict({name: Dataset.from_list(rows) for name, rows in splits.items()}).save_to_disk(
        str(params.paths.processed / "datasets"))


def write_model(params, model, tokenizer, pairs: bool) -> None:
    """What train leaves in paths.model for causal_lm: safetensors, tokenizer, lm.json."""
    folder = params.paths.model
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    write_json(folder / "lm.json", {
        "task": "causal_lm", "format": "pairs" if pairs else "text",
        "template": TEMPLATE if pairs else None, "block_size": 32, "max_length": 64,
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id})


# --- the HTTP services: a real `bentoml serve` and the checks both services share ------------------

@contextmanager
def serving(target: str, home: Path, cwd: Path, log: Path, host: str | None = "127.0.0.1",
            args: tuple[str, ...] = (), env_vars: dict[str, str] | None = None):
    """Run `bentoml serve <target> <args>` on a free 127.0.0.1 port; yield its URL; kill it on exit.

    ``host=None`` passes no --host: the service's own default binding applies. ``env_vars``: more
    environment for the server (e.g. the variable holding its API keys).
    """
    port = free_port()
    env = serve_env(home, env_vars)
    cmd = [str(Path(sys.executable).with_name("bentoml")), "serve", target, *args,
           "--port", str(port)]
    cmd += ["--host", host] if host else []
    with log.open("w") as out:
        # A session of its own: the teardown kills BentoML's worker processes with it.
        proc = start_process_group(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        ready_s = wait_healthy(f"{url}/readyz", proc, log, what="bentoml serve")
        print(f"`bentoml serve {target}` ready in {ready_s:.1f}s")
        yield url
    finally:
        stop_process_group(proc)


def serve_env(home: Path, env_vars: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a `bentoml serve` under test: the store in ``home``, no BENTOML_HOST."""
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True",
           **(env_vars or {})}
    env.pop("BENTOML_HOST", None)
    return env


def package_tiny(params, home: Path) -> dict:
    from stages import package

    with pytest.MonkeyPatch.context() as mp, bentoml_home(home):
        mp.chdir(REPO)  # the build context, as under `dvc repro`
        return package.main(params)


# Bodies no JSON client sends on purpose; each must get a 4xx, never a 500. Used by
# tests/test_service.py and tests/test_generate_service.py: (name, body bytes, content type).
HOSTILE_BODIES = [
    ("non-UTF-8 bytes", b'{"texts": ["caf\xe9 \xff\xfe"]}', "application/json"),
    ("lone surrogate", b'{"texts": ["half an emoji \\ud83d"]}', "application/json"),
    ("JSON array", b'["fine"]', "application/json"),
    ("JSON null", b"null", "application/json"),
    ("empty body", b"", "application/json"),
    ("form-encoded", b"texts=fine", "application/x-www-form-urlencoded"),
    ("binary", bytes(range(256)), "application/octet-stream"),
    ("multipart without boundary", b'{"texts": ["fine"]}', "multipart/form-data"),
    ("multipart garbage", b"not multipart", "multipart/form-data; boundary=xyz"),
]


def assert_hostile_body_refused(endpoint: str, body: bytes, content_type: str) -> None:
    """POST a HOSTILE_BODIES entry: a 4xx with a JSON error, never a 500."""
    import httpx

    resp = httpx.post(endpoint, content=body, headers={"content-type": content_type}, timeout=30)
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:300])
    assert "error" in resp.text


def openapi_examples(url: str) -> dict[str, dict]:
    """{route: request example} of every POST endpoint on the service's OpenAPI page."""
    import httpx

    spec = httpx.get(f"{url}/docs.json", timeout=10).json()
    found = {}
    for route, ops in spec["paths"].items():
        if "post" in ops:
            [media] = ops["post"]["requestBody"]["content"].values()
            found[route] = media["schema"].get("example")
    return found


def assert_every_example_works(url: str, routes: set[str], timeout_s: float) -> None:
    """The OpenAPI page has an example for each of ``routes`` (and no other POST endpoint), and
    posting each one as is gets 200."""
    import httpx

    examples = openapi_examples(url)
    assert set(examples) == routes
    for route, example in examples.items():
        assert example is not None, f"{route} has no example on /docs.json"
        resp = httpx.post(f"{url}{route}", json=example, timeout=timeout_s)
        assert resp.status_code == 200, (route, resp.text[:300])


def raw_request(url: str, head: str, body: bytes) -> bytes:
    """Send a request head and (part of) a body over a plain socket; return the response's start."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode() + body)
        answer = b""
        # Head and body of the answer may arrive in separate packets: read until the server
        # closes (a 413 comes with `connection: close`), or 64 KiB.
        while len(answer) < 65536:
            try:
                part = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not part:
                break
            answer += part
        return answer
