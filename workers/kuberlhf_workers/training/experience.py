"""A scored rollout turned into what the objectives train on: KL, advantages, returns.

Pure torch. Every trainer rank computes it for the whole batch itself (cheap and deterministic,
so all ranks agree) and then trains on its shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kuberlhf.api import RLHFJobSpec
from kuberlhf_workers.training import algorithms
from kuberlhf_workers.training.batch import Batch


@dataclass
class Experience:
    """Everything a trainer rank needs for one update, for the whole batch."""

    batch: Batch
    rewards: torch.Tensor
    kl: torch.Tensor
    ref_logp: torch.Tensor | None
    values: torch.Tensor | None
    advantages: torch.Tensor
    returns: torch.Tensor | None
    # The trainer's own log-probs of the sampled tokens before this update, when a rollout
    # correction compares them with the engine's (behaviour_logp); else the engine's stand in.
    old_logp: torch.Tensor | None = None
    kl_coef: float = 0.0  # this step's coefficient (adaptive KL moves it between steps)
    shaping: torch.Tensor | None = None  # what reward shaping (overlong) added to `rewards`
    # True while old_logp's rows are still to be read off the loss's own forward pass: when an
    # epoch makes one optimizer step, its micro-batches all see the weights from before the update.
    old_from_loss: bool = False


def make_experience(
    spec: RLHFJobSpec,
    batch: Batch,
    rewards: torch.Tensor,
    ref_logp: torch.Tensor | None,
    values: torch.Tensor | None,
    kl_coef: float | None = None,
) -> Experience:
    """`kl_coef` overrides spec.kl.coef (the adaptive controller's current value)."""
    mask = batch.response_mask
    coef = spec.kl.coef if kl_coef is None else kl_coef
    shaping = None
    overlong = spec.reward.overlong if spec.reward is not None else None
    if overlong is not None:
        lengths = mask.sum(-1)
        shaping = algorithms.overlong_penalty(
            lengths, spec.data.max_new_tokens, overlong.buffer_tokens, overlong.penalty
        )
        rewards = rewards + shaping
    if ref_logp is not None:
        kl = algorithms.kl_estimate(batch.behaviour_logp, ref_logp, spec.kl.estimator) * mask
    else:
        kl = torch.zeros_like(mask)
    advantages, returns = algorithms.compute_advantages(
        spec.algorithm,
        rewards,
        mask,
        spec.rollout.samples_per_prompt,
        kl=kl,
        kl_coef=coef,
        kl_mode=spec.kl.mode,
        values=values,
        gamma=spec.loss.gamma,
        lam=spec.loss.lambd,
    )
    return Experience(batch, rewards, kl, ref_logp, values, advantages, returns, None, coef, shaping)


def batch_metrics(exp: Experience, samples_per_prompt: int | None = None) -> dict[str, float]:
    """The step's rollout statistics (reported once, by the actor's rank 0). With a group size, also
    how many prompt groups were trained and how many of them had one reward for every sample (zero
    advantage under a group baseline: what rollout.dynamicSampling keeps out)."""
    mask = exp.batch.response_mask
    lengths = mask.sum(-1)
    kl_mean = float((exp.kl.sum(-1) / lengths.clamp(min=1)).mean())
    raw = exp.rewards if exp.shaping is None else exp.rewards - exp.shaping
    extra = {} if exp.shaping is None else {"overlong_penalty_mean": float(exp.shaping.mean())}
    if samples_per_prompt is not None:
        groups = raw.view(-1, samples_per_prompt)
        flat = groups.amax(-1) == groups.amin(-1)
        extra |= {"groups_trained": float(len(groups)), "groups_zero_variance": float(flat.sum())}
    return extra | {
        "reward_mean": float(raw.mean()),
        "reward_std": float(raw.std()) if len(raw) > 1 else 0.0,
        "kl": kl_mean,
        "response_length_mean": float(lengths.mean()),
        "advantage_mean": float(algorithms.masked_mean(exp.advantages, mask)),
    }
