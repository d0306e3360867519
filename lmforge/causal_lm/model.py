"""causal_lm model side, shared by stages train and evaluate: the starting model (from scratch or
pretrained), LoRA adapters, token-weighted NLL, and the Lightning module train fits.

Nothing here reads params files or starts MLflow runs; the stages do.
"""

from __future__ import annotations

import lightning as L
import torch
from torchmetrics import Metric

from lmforge.common import IGNORE, UserError
from lmforge.models import cannot_load, remote_code, resolve_model_source
from lmforge.params import SCRATCH, Lora, ModelSource, Params, Scratch, Train
from lmforge.training.lit import adamw_config


def special_ids(tokenizer) -> dict[str, int]:
    """eos / bos / pad ids for a config; bos falls back to eos (one <|endoftext|> marks both)."""
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    return {"eos_token_id": eos, "bos_token_id": bos, "pad_token_id": tokenizer.pad_token_id}


def scratch_config(scratch: Scratch, tokenizer):
    """A GPT-2 or Llama config from ``model.scratch``, sized to the tokenizer's vocabulary.

    GPT-2 drops out on embeddings, residuals and attention; Hugging Face's Llama has attention
    dropout only.
    """
    from transformers import GPT2Config, LlamaConfig

    ids = special_ids(tokenizer)
    inner = scratch.intermediate or 4 * scratch.hidden
    if scratch.architecture == "gpt2":
        return GPT2Config(
            vocab_size=len(tokenizer), n_positions=scratch.context, n_embd=scratch.hidden,
            n_layer=scratch.layers, n_head=scratch.heads, n_inner=inner,
            resid_pdrop=scratch.dropout, embd_pdrop=scratch.dropout, attn_pdrop=scratch.dropout,
            **ids)
    return LlamaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=scratch.context,
        hidden_size=scratch.hidden, num_hidden_layers=scratch.layers,
        num_attention_heads=scratch.heads, intermediate_size=inner,
        attention_dropout=scratch.dropout, **ids)


def load_pretrained(cfg: ModelSource, tokenizer):
    """The pretrained causal LM (safetensors only), embeddings grown when the tokenizer is larger."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolve_model_source(cfg.source), use_safetensors=True,
            trust_remote_code=remote_code(cfg.trust_remote_code),
            dtype=torch.float32)  # mixed precision casts; never train in a half-precision copy
    except (OSError, ValueError) as err:
        raise cannot_load(cfg.source, "a causal language model", err) from None
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    return model


def start_model(params: Params, tokenizer):
    """The untrained starting model, exactly as train builds it (evaluate rebuilds it for
    ``perplexity_start``): from ``model.scratch`` or the pretrained ``model.source``, no LoRA.

    Seeded with ``train.seed`` right before construction, so a scratch model's random weights
    (and a grown embedding's new rows) are the same in every stage. The mode is left as built.
    """
    from transformers import AutoModelForCausalLM

    cfg = params.model
    config = scratch_config(cfg.scratch, tokenizer) if cfg.source == SCRATCH else None
    # workers=True as train's main() seeds: False would switch off its DataLoader worker seeding.
    L.seed_everything(params.train.seed, workers=True, verbose=False)
    if config is not None:
        return AutoModelForCausalLM.from_config(config)
    return load_pretrained(cfg, tokenizer)


def adaptable_modules(model) -> list[str]:
    """Names (last segment) of the layers LoRA can adapt: linear and GPT-2's Conv1D."""
    from transformers.pytorch_utils import Conv1D

    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear | Conv1D)})


def with_lora(model, lora: Lora):
    """``model`` wrapped in LoRA adapters (peft): only the adapters train."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(task_type="CAUSAL_LM", r=lora.r, lora_alpha=lora.alpha,
                        lora_dropout=lora.dropout, target_modules=lora.target_modules)
    try:
        return get_peft_model(model, config)
    except ValueError as err:  # modules not found, or no default for this architecture
        raise UserError(f"model.lora.target_modules {lora.target_modules}: "
                        f"{str(err).splitlines()[0]} This model's adaptable layers: "
                        f"{', '.join(adaptable_modules(model))}") from None


def merged(model):
    """The plain model: LoRA adapters folded into the weights they adapt (a no-op without LoRA)."""
    from peft import PeftModel

    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def trainable_model(params: Params, tokenizer):
    """What train fits: the starting model, with LoRA adapters when ``model.lora`` is set."""
    model = start_model(params, tokenizer)
    return with_lora(model, params.model.lora) if params.model.lora else model


def for_export(model, lm_meta: dict):
    """The merged model, its generation config stopping at EOS and padding with prepare's pad."""
    model = merged(model)
    model.generation_config.eos_token_id = lm_meta["eos_token_id"]
    model.generation_config.pad_token_id = lm_meta["pad_token_id"]
    return model


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL and the number of target tokens (labels shifted by one, -100 skipped).

    logits (B, T, V), labels (B, T). Computed in fp32 whatever the autocast dtype.
    """
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
        reduction="sum")
    return nll, (targets != IGNORE).sum()


class MeanTokenNLL(Metric):
    """Token-weighted mean NLL over every batch seen (and every DDP rank), not a mean of means."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("nll", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        nll, tokens = token_nll(logits, labels)
        self.nll += nll.double()
        self.tokens += tokens

    def compute(self) -> torch.Tensor:
        return (self.nll / self.tokens).float()


class CausalLM(L.LightningModule):
    """A thin wrapper: the Hugging Face model computes the training loss; validation is the
    token-weighted NLL of the whole validation set (val_loss) and its exp (val_perplexity)."""

    def __init__(self, model: torch.nn.Module, cfg: Train) -> None:
        super().__init__()
        self.model, self.cfg = model, cfg
        self.model.train()  # from_pretrained returns eval mode: dropout would be off
        self.val_nll = MeanTokenNLL()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch, use_cache=False).loss  # a cache only serves generation
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        inputs = {k: v for k, v in batch.items() if k != "labels"}  # our NLL, not the batch mean
        self.val_nll.update(self.model(**inputs, use_cache=False).logits, batch["labels"])

    def on_validation_epoch_end(self) -> None:
        loss = self.val_nll.compute()  # reduced over DDP ranks
        self.log_dict({"val_loss": loss, "val_perplexity": loss.exp()})
        self.val_nll.reset()

    def configure_optimizers(self) -> dict:
        return adamw_config(self.model, self.cfg, int(self.trainer.estimated_stepping_batches))
