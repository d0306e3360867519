"""The task catalogue: what each task produces, declared once.

A task is a folder of code with the same shape plus one entry here: ``lmforge/<task>/data.py``
(prepare: ``encode_splits``), ``model.py`` (train: its LightningModule), ``evaluate.py`` (evaluate:
``evaluate``) and ``export.py`` (export: ``ExportScorer``). Stages dispatch on ``params.task`` with
one plain ``if``; everything they need to know about a task's outputs (metric names, validation
monitors, files, plots, reports, the Bento's service) is read from its ``Task`` below.

Plain data, no imports of the task folders: the schema (lmforge/params.py) checks params against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CLASSIFICATION = "classification"
CAUSAL_LM = "causal_lm"


@dataclass(frozen=True)
class Task:
    """What one task produces, as the stages, the schema and the `lmforge` command read it."""

    name: str
    meta_file: str  # prepare writes it beside the splits, train copies it beside the model
    metrics: tuple[str, ...]  # top-level keys of paths.eval_metrics (what gate keys may name)
    monitors: tuple[str, ...]  # validation metrics train logs each epoch (val.csv columns)
    default_monitor: tuple[str, str]  # (monitor, mode) the best checkpoint follows without early stopping
    headline: tuple[str, ...]  # test metrics in the Bento's labels and `lmforge lineage`
    export_metrics: tuple[str, ...]  # what stage export scores for PyTorch and ONNX alike
    export_tolerances: dict[str, dict]  # default export.tolerances (Tolerance fields)
    plots: tuple[str, ...]  # files evaluate writes into paths.eval_plots
    reports: tuple[str, ...]  # files evaluate writes into paths.eval_reports
    service: str  # the Bento's service (bentofile syntax), with its endpoints
    endpoints: tuple[str, ...]
    # causal_lm on prompt/response pairs or conversations (data.chat) adds these to metrics and
    # headline: generations scored against the responses (the last assistant turns).
    pair_metrics: tuple[str, ...] = ()
    pair_headline: tuple[str, ...] = ()
    description: str = field(default="", compare=False)

    def eval_metrics(self, pairs: bool) -> tuple[str, ...]:
        """Top-level keys of paths.eval_metrics for this task (pairs: the data has prompts, as
        pairs or conversations)."""
        return self.metrics + (self.pair_metrics if pairs else ())

    def headline_metrics(self, pairs: bool) -> tuple[str, ...]:
        return self.headline + (self.pair_headline if pairs else ())


TASKS: dict[str, Task] = {
    CLASSIFICATION: Task(
        name=CLASSIFICATION,
        description="text -> label: a pretrained encoder fine-tuned with a fresh head",
        meta_file="labels.json",
        metrics=("accuracy", "f1_macro", "f1_weighted", "loss", "n", "per_class"),
        monitors=("val_loss", "val_accuracy", "val_f1_macro"),
        default_monitor=("val_accuracy", "max"),
        headline=("accuracy", "f1_macro"),
        export_metrics=("accuracy", "f1_macro"),
        # int8 weights may move accuracy and F1 by a point
        export_tolerances={"accuracy": {"direction": "higher", "abs": 0.01},
                           "f1_macro": {"direction": "higher", "abs": 0.01}},
        plots=("confusion.csv", "per_class.csv"),
        reports=("misclassified.csv",),
        service="bento.service:Classifier",
        endpoints=("/classify", "/metadata"),
    ),
    CAUSAL_LM: Task(
        name=CAUSAL_LM,
        description="next-token prediction on plain text, a response given a prompt, or the "
                    "assistant turns of conversations",
        meta_file="lm.json",
        metrics=("perplexity", "perplexity_start", "loss", "tokens", "n"),
        pair_metrics=("bleu", "rouge1", "rouge2", "rougeL", "exact_match", "generated"),
        monitors=("val_loss", "val_perplexity"),
        default_monitor=("val_loss", "min"),
        headline=("perplexity",),
        pair_headline=("bleu", "rougeL"),
        export_metrics=("perplexity",),
        export_tolerances={"perplexity": {"direction": "lower", "rel": 0.05}},  # 5%
        plots=("perplexity.csv",),
        reports=("generations.csv",),
        service="bento.generate:Generator",
        endpoints=("/generate", "/generate_stream", "/metadata", "/v1/chat/completions",
                   "/v1/completions"),  # and GET /v1/models
    ),
}

# The params sections that decide the trained model: hashed into the model's params_sha256 and
# logged as the MLflow run's params.
MODEL_SECTIONS = ("task", "data", "model", "prepare", "train")


def task(name: str) -> Task:
    """The catalogue entry of ``name`` (params has already checked it is one)."""
    return TASKS[name]
