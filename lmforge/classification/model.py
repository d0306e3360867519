"""Classification model side: the pretrained encoder with a fresh head for our labels, and the
Lightning module stage train fits."""

from __future__ import annotations

import lightning as L
import torch

from lmforge.models import cannot_load, remote_code, resolve_model_source
from lmforge.params import Train
from lmforge.training.lit import adamw_config


def load_pretrained(source: str, mapping: dict, trust_remote_code: bool = False):
    """The pretrained model with a fresh head for our labels (another head size is replaced).

    Weights come from safetensors only; code shipped with the model runs only when
    ``model.trust_remote_code`` is on (with a warning).
    """
    from transformers import AutoModelForSequenceClassification

    id2label = {int(i): name for i, name in mapping["id2label"].items()}
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            resolve_model_source(source), num_labels=len(id2label), id2label=id2label,
            label2id=mapping["label2id"], ignore_mismatched_sizes=True, use_safetensors=True,
            trust_remote_code=remote_code(trust_remote_code),
            dtype=torch.float32)  # mixed precision casts; never train in a half-precision copy
    except (OSError, ValueError) as err:
        raise cannot_load(source, "a classification model", err) from None


class ClassifierModule(L.LightningModule):
    """A thin wrapper: the Hugging Face model computes the loss; metrics cover the whole val set."""

    def __init__(self, model: torch.nn.Module, cfg: Train) -> None:
        super().__init__()
        from torchmetrics import MeanMetric
        from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

        self.model, self.cfg = model, cfg
        # from_pretrained returns eval mode (dropout off) and Lightning keeps each module's mode.
        self.model.train()
        n = model.config.num_labels
        # Metric objects (not per-batch means) so DDP reduces over the whole validation set.
        self.val_loss = MeanMetric()
        self.val_accuracy = MulticlassAccuracy(n, average="micro")
        self.val_f1_macro = MulticlassF1Score(n, average="macro")

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self.model(**batch)
        preds, labels = out.logits.argmax(-1), batch["labels"]  # (B,)
        self.val_loss.update(out.loss, weight=len(labels))
        self.val_accuracy.update(preds, labels)
        self.val_f1_macro.update(preds, labels)
        self.log_dict({"val_loss": self.val_loss, "val_accuracy": self.val_accuracy,
                       "val_f1_macro": self.val_f1_macro}, on_epoch=True, batch_size=len(labels))

    def configure_optimizers(self) -> dict:
        return adamw_config(self.model, self.cfg, int(self.trainer.estimated_stepping_batches))
