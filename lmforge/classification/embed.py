"""Sentence embeddings of the configured encoder (``model.source``, untouched by training): the last
hidden states mean-pooled over real tokens and L2-normalized, as sentence-transformers uses the
default all-MiniLM-L6-v2. Stage audit's cheap classifier and stage select's diversity guard read
them."""

from __future__ import annotations

import numpy as np

from lmforge.models import cannot_load, device, load_tokenizer, remote_code, resolve_model_source


def load_encoder(source: str, trust_remote_code: bool = False):
    """The pretrained encoder (no head, eval mode, CPU or GPU) and its tokenizer."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    resolved = resolve_model_source(source)
    try:
        model = AutoModel.from_pretrained(resolved, use_safetensors=True,
                                          trust_remote_code=remote_code(trust_remote_code))
    except (OSError, ValueError) as err:
        raise cannot_load(source, "an encoder", err) from None
    return model.to(device()).eval(), load_tokenizer(resolved, trust_remote_code)


def mean_pool(hidden, mask):
    """(B, T, H) hidden states, (B, T) attention mask -> (B, H) unit vectors: padding is left out."""
    import torch

    weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
    return torch.nn.functional.normalize(pooled, dim=1)


def embed(texts: list[str], model, tokenizer, max_length: int, batch_size: int) -> np.ndarray:
    """(N, H) float32 unit vectors, in the texts' order; texts are batched by length (less padding)."""
    import torch

    where = next(model.parameters()).device
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt").to(where)
            hidden = model(**batch).last_hidden_state  # (B, T, H)
            out[idx] = mean_pool(hidden, batch["attention_mask"]).float().cpu().numpy()
    return out
