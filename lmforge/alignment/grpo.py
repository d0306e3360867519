"""GRPO (Shao et al. 2024, DeepSeekMath): per prompt, sample a group of completions, score each
with the rewards, and push up the log-probability of those above their group's mean.

Per completion i of a group: advantage ``A_i = (R_i - mean(R)) / (std(R) + 1e-4)``; a group whose
rewards are all equal teaches nothing (all A_i = 0: ``zero_std_share`` counts them). Per completion
token t, with the ratio ``rho = p(t) / p_old(t)`` to the model that sampled it:

    loss_t = -min(rho * A, clip(rho, 1 - clip_range, 1 + clip_range) * A) + kl_coef * KL_t

``KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1``, the unbiased, never negative estimator of
KL(policy || reference) (Schulman's k3). Averaged over a completion's tokens, then completions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bento.prompts import left_pad


@dataclass
class Samples:
    """One step's sampled completions: G rows per prompt, prompts left-padded, completions
    right-padded after their EOS."""

    input_ids: torch.Tensor  # (N, P + C): prompt then completion
    attention_mask: torch.Tensor  # (N, P + C)
    completion_mask: torch.Tensor  # (N, C): 1 up to and including the first EOS
    texts: list[str]  # N decoded completions, special tokens removed

    @property
    def prompt_width(self) -> int:
        return self.input_ids.shape[1] - self.completion_mask.shape[1]


def completion_mask(completions: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 on each row's tokens up to and including its first EOS, 0 after (C: all, no EOS)."""
    is_eos = completions == eos_id
    after = (is_eos.cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    return (~after).long()


@torch.no_grad()
def sample(model, tokenizer, prompts: list[list[int]], group: int, gen: dict) -> Samples:
    """``group`` completions of every prompt (token ids, already cut to fit), sampled with ``gen``
    (temperature, top_p, max_new_tokens); the torch RNG decides, so seed it first."""
    rows = [p for p in prompts for _ in range(group)]
    ids, mask = left_pad(rows, tokenizer.pad_token_id)
    ids, mask = torch.tensor(ids), torch.tensor(mask)
    dev = next(model.parameters()).device
    out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), do_sample=True,
                         temperature=gen["temperature"], top_p=gen["top_p"], top_k=0,
                         max_new_tokens=gen["max_new_tokens"], eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id).cpu()
    completions = out[:, ids.shape[1]:]
    done = completion_mask(completions, tokenizer.eos_token_id)
    completions = completions.masked_fill(done == 0, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return Samples(torch.cat([ids, completions], 1), torch.cat([mask, done], 1), done, texts)


def group_advantages(rewards: torch.Tensor, group: int) -> tuple[torch.Tensor, float]:
    """Advantages (N,) of rewards (N,) in consecutive groups, and the share of groups whose rewards
    are all equal (they teach nothing)."""
    grouped = rewards.view(-1, group)  # (prompts, G)
    std = grouped.std(-1, keepdim=True)
    adv = (grouped - grouped.mean(-1, keepdim=True)) / (std + 1e-4)
    return adv.flatten(), (std.squeeze(-1) < 1e-8).float().mean().item()


def completion_logps(model, s: Samples) -> torch.Tensor:
    """Log-probability of each completion token (N, C) under ``model``; positions follow the
    attention mask, as generate() numbered them."""
    positions = (s.attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=s.input_ids, attention_mask=s.attention_mask, position_ids=positions,
                   use_cache=False).logits
    width = s.prompt_width
    logits = logits[:, width - 1 : -1].float()  # (N, C, V): each predicts the next token
    targets = s.input_ids[:, width:]
    return torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def objective(logps: torch.Tensor, old: torch.Tensor, ref: torch.Tensor, adv: torch.Tensor,
              mask: torch.Tensor, clip: float, kl_coef: float) -> tuple[torch.Tensor, float]:
    """The GRPO loss (see the module) and the mean per-token KL, from (N, C) log-probs of the
    policy, the sampling policy and the reference, advantages (N,) and the completion mask (N, C)."""
    ratio = torch.exp(logps - old)
    adv = adv.unsqueeze(-1)  # (N, 1)
    policy = -torch.min(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    kl = torch.exp(ref - logps) - (ref - logps) - 1
    per_token = (policy + kl_coef * kl) * mask
    loss = (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    return loss, ((kl * mask).sum() / mask.sum().clamp(min=1)).item()


def prompt_room(model, max_new_tokens: int) -> int:
    """Prompt tokens that fit beside the completion in the model's context."""
    return int(model.config.max_position_embeddings) - max_new_tokens


class GrpoSteps:
    """GRPO on the train split's prompts, rewards against ``data.response_column``."""

    def __init__(self, params, policy, reference, tokenizer, meta: dict) -> None:
        from lmforge.alignment.data import columns, prompt_ids, read_split
        from lmforge.alignment.rewards import load_rewards

        self.params, self.policy, self.reference, self.tokenizer = params, policy, reference, tokenizer
        cfg = params.align.grpo
        self.rewards = load_rewards(cfg.rewards)
        self.meta, self.roles = meta, columns(params.data, preferences=False)
        df = read_split(params.paths.interim, "train", self.roles)
        room = prompt_room(policy, cfg.max_new_tokens)
        self.prompts, self.references = df["prompt"].tolist(), df["chosen"].tolist()
        self.ids = [x[-room:] for x in prompt_ids(tokenizer, self.prompts, meta["template"])]
        self.gen = {"temperature": cfg.temperature, "top_p": cfg.top_p,
                    "max_new_tokens": cfg.max_new_tokens}

    def step(self, step: int, update) -> dict:
        from lmforge.alignment.data import batch_indices
        from lmforge.alignment.loop import as_reference
        from lmforge.alignment.rewards import score

        align, cfg = self.params.align, self.params.align.grpo
        idx = batch_indices(len(self.ids), align.batch_size, step - 1, align.seed)
        g = cfg.group_size
        s = sample(self.policy, self.tokenizer, [self.ids[i] for i in idx], g, self.gen)
        dev = next(self.policy.parameters()).device
        s.input_ids, s.attention_mask = s.input_ids.to(dev), s.attention_mask.to(dev)
        s.completion_mask = s.completion_mask.to(dev)
        total, each = score(self.rewards, [self.prompts[i] for i in idx for _ in range(g)], s.texts,
                            [self.references[i] for i in idx for _ in range(g)])
        rewards = torch.tensor(total)
        adv, zero_std = group_advantages(rewards, g)
        with torch.no_grad():
            with as_reference(self.policy, self.reference) as ref_model:
                ref = completion_logps(ref_model, s)
            old = completion_logps(self.policy, s) if cfg.updates_per_batch > 1 else None
        for _ in range(cfg.updates_per_batch):
            logps = completion_logps(self.policy, s)
            loss, kl = objective(logps, logps.detach() if old is None else old, ref, adv.to(dev),
                                 s.completion_mask, cfg.clip_range, cfg.kl_coef)
            update(loss)
        metrics = {"loss": loss.item(), "reward_mean": rewards.mean().item(),
                   "reward_std": rewards.std().item(), "kl": kl,
                   "completion_length": s.completion_mask.sum(-1).float().mean().item(),
                   "zero_std_share": zero_std}
        for name, values in each.items():
            t = torch.tensor(values)
            metrics |= {f"{name}_mean": t.mean().item(), f"{name}_std": t.std().item()}
        return metrics

    def test_metrics(self) -> dict:
        """Greedy completions of the test prompts: mean reward and exact match, keys test_*."""
        from lmforge.alignment.data import read_split
        from lmforge.alignment.evaluate import greedy_scores

        align = self.params.align
        test = read_split(self.params.paths.interim, "test", self.roles)
        scores = greedy_scores(self.policy, self.tokenizer, test, self.meta["template"],
                               align.grpo.rewards, align.grpo.max_new_tokens, align.eval_batch_size)
        return {f"test_{k}": v for k, v in scores.items()}
