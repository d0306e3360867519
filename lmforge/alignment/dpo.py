"""DPO-family losses on sequence log-probabilities, and their metrics.

Notation per preference pair: ``c``/``r`` the summed log-probability of the chosen/rejected answer
tokens (EOS included) under the policy, ``ref_c``/``ref_r`` under the frozen reference (the model
train wrote), ``n_c``/``n_r`` their token counts, and the log-ratio margin
``delta = (c - ref_c) - (r - ref_r)``. The losses (per pair, then averaged), as TRL implements them:

- sigmoid (DPO, Rafailov et al. 2023), with label smoothing eps (conservative DPO):
  ``-(1 - eps) * logsigmoid(beta * delta) - eps * logsigmoid(-beta * delta)``;
- ipo (Azar et al. 2023), length-normalized as TRL does:
  ``((c - ref_c) / n_c - (r - ref_r) / n_r - 1 / (2 * beta)) ** 2``;
- robust (Chowdhury et al. 2024):
  ``(-(1 - eps) * logsigmoid(beta * delta) + eps * logsigmoid(-beta * delta)) / (1 - 2 * eps)``;
- simpo (Meng et al. 2024), reference-free, on mean per-token log-probabilities, with
  ``z = beta * (c / n_c - r / n_r) - gamma`` and ``gamma = simpo_gamma * beta``:
  ``-(1 - eps) * logsigmoid(z) - eps * logsigmoid(-z)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.common import IGNORE
from lmforge.params import Dpo


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position log-probability of each next label token, and the mask of counted positions.

    logits (B, T, V), labels (B, T) with IGNORE where no loss counts; returns two (B, T-1) tensors
    (log-probs are 0 where the mask is 0). Computed in fp32.
    """
    targets = labels[:, 1:]  # position t predicts token t+1
    mask = targets != IGNORE
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logps.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return picked * mask, mask


def token_kl(logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over counted positions of KL(policy || reference) of the next-token distributions.

    logits, ref_logits (B, T, V); mask (B, T-1) as token_logps returns it.
    """
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    ref = torch.log_softmax(ref_logits[:, :-1].float(), dim=-1)
    kl = (logp.exp() * (logp - ref)).sum(-1)  # (B, T-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def pair_loss(c: torch.Tensor, r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
              n_c: torch.Tensor, n_r: torch.Tensor, cfg: Dpo) -> torch.Tensor:
    """The loss of each pair (B,), from (B,) sequence log-probs and token counts (see the module)."""
    beta, eps = cfg.beta, cfg.label_smoothing
    delta = (c - ref_c) - (r - ref_r)
    if cfg.loss == "sigmoid":
        return -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    if cfg.loss == "ipo":
        return ((c - ref_c) / n_c.clamp(min=1) - (r - ref_r) / n_r.clamp(min=1) - 1 / (2 * beta)) ** 2
    if cfg.loss == "robust":
        return (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    z = beta * (c / n_c.clamp(min=1) - r / n_r.clamp(min=1)) - cfg.simpo_gamma * beta  # simpo
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """(summed log-probs (B,), token counts (B,), logits (B, T, V), mask (B, T-1)) of a batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   use_cache=False).logits
    logps, mask = token_logps(logits, batch["labels"])
    return logps.sum(-1), mask.sum(-1), logits, mask


def pair_terms(policy_out: tuple, ref_out: tuple, cfg: Dpo) -> tuple[torch.Tensor, dict]:
    """Mean loss over the pairs and the step's metrics, from sequence_logps of the policy and the
    reference on a pair_batch (chosen rows, then rejected rows)."""
    (logps, counts, logits, mask), (ref_logps, _, ref_logits, _) = policy_out, ref_out
    c, r = logps.chunk(2)
    ref_c, ref_r = ref_logps.chunk(2)
    n_c, n_r = counts.chunk(2)
    loss = pair_loss(c, r, ref_c, ref_r, n_c, n_r, cfg).mean()
    with torch.no_grad():
        reward_c, reward_r = cfg.beta * (c - ref_c), cfg.beta * (r - ref_r)  # implicit rewards
        metrics = {
            "loss": loss.item(),
            "reward_accuracy": (reward_c > reward_r).float().mean().item(),
            "reward_margin": (reward_c - reward_r).mean().item(),
            "chosen_logps": c.mean().item(),
            "rejected_logps": r.mean().item(),
            "kl": token_kl(logits, ref_logits, mask).item(),
        }
    return loss, metrics


class DpoSteps:
    """DPO on the train split's preference rows; ``step`` is one optimizer step (loop.run)."""

    def __init__(self, params, policy, reference, tokenizer, meta: dict) -> None:
        from lmforge.alignment.data import columns, encode_preferences, read_split

        self.params, self.policy, self.reference = params, policy, reference
        self.pad_id = tokenizer.pad_token_id
        interim, roles = params.paths.interim, columns(params.data, preferences=True)
        self.train = encode_preferences(read_split(interim, "train", roles), tokenizer, meta)
        self.test = encode_preferences(read_split(interim, "test", roles), tokenizer, meta)

    def terms(self, pairs: list[dict]) -> tuple[torch.Tensor, dict]:
        from lmforge.alignment.data import pair_batch
        from lmforge.alignment.loop import as_reference

        dev = next(self.policy.parameters()).device
        batch = {k: v.to(dev) for k, v in pair_batch(pairs, self.pad_id).items()}
        out = sequence_logps(self.policy, batch)
        with torch.no_grad(), as_reference(self.policy, self.reference) as ref:
            ref_out = sequence_logps(ref, batch)
        return pair_terms(out, ref_out, self.params.align.dpo)

    def step(self, step: int, update) -> dict:
        from lmforge.alignment.data import batch_indices

        cfg = self.params.align
        idx = batch_indices(len(self.train), cfg.batch_size, step - 1, cfg.seed)
        loss, metrics = self.terms([self.train[i] for i in idx])
        update(loss)
        return metrics

    @torch.no_grad()
    def test_metrics(self) -> dict:
        """The step metrics over the whole test split (means weighted by pairs), keys test_*."""
        size, sums = self.params.align.eval_batch_size, {}
        for start in range(0, len(self.test), size):
            pairs = self.test[start : start + size]
            for key, value in self.terms(pairs)[1].items():
                sums[key] = sums.get(key, 0.0) + value * len(pairs)
        return {f"test_{k}": v / len(self.test) for k, v in sums.items()}
