"""The maths of post-training as pure torch functions: KL estimators, advantages, losses (the
online ones, and the offline `sft_loss`, `pairwise_loss` and `dpo_loss`).

Shapes: `rewards` is [B] (one scalar per sampled completion, grouped by prompt: rows
i*G .. i*G+G-1 share a prompt); per-token tensors are [B, T] over response tokens only, and
`mask` is a 0/1 [B, T] tensor marking real (non-padding) response tokens. Keeping these free of
Ray, DeepSpeed and models makes every formula checkable by hand in unit tests.

Advantage estimators are looked up by algorithm name in `ESTIMATORS` (what else an algorithm
implies lives in `kuberlhf.api.ALGORITHMS`): adding one is a function and a row in each table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from kuberlhf.api import ALGORITHMS, GROUP_ALGORITHMS, Aggregation, Algorithm

Estimator = Literal["k1", "k2", "k3"]
EPS = 1e-8
GROUP_STD_EPS = 1e-6
K3_LOG_RATIO_LIMIT = 20.0


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over masked-in entries; an all-padding row gives 0 rather than NaN."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp_min(1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit (population) variance over masked-in entries; padding stays 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + EPS) * mask


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: Estimator) -> torch.Tensor:
    """Schulman's per-token estimators of KL(policy || reference) from samples of the policy."""
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        # Clamped: exp() of a large ratio on a rare token would otherwise overflow to inf.
        neg = (-log_ratio).clamp(-K3_LOG_RATIO_LIMIT, K3_LOG_RATIO_LIMIT)
        return torch.exp(neg) - neg - 1
    raise ValueError(f"spec.kl.estimator: got {estimator!r}, allowed: k1, k2, k3")


def _normalised(groups: torch.Tensor, mean: torch.Tensor, count: torch.Tensor,
                valid: torch.Tensor) -> torch.Tensor:
    # Unbiased std over the group's members that count (all of them unless episodes failed).
    var = ((groups - mean) ** 2 * valid).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)
    return (groups - mean) / (var.sqrt() + GROUP_STD_EPS)


def _centred(groups: torch.Tensor, mean: torch.Tensor, count: torch.Tensor,
             valid: torch.Tensor) -> torch.Tensor:
    return groups - mean


def _leave_one_out(groups: torch.Tensor, mean: torch.Tensor, count: torch.Tensor,
                   valid: torch.Tensor) -> torch.Tensor:
    # r_i - mean of the others == G/(G-1) * (r_i - group mean), G the members that count
    return (groups - mean) * count / (count - 1).clamp(min=1)


GroupBaseline = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# How each group estimator baselines a reward against its prompt's other samples.
GROUP_BASELINES: dict[Algorithm, GroupBaseline] = {
    "grpo": _normalised,
    "dr_grpo": _centred,
    "reinforce_pp_baseline": _centred,
    "rloo": _leave_one_out,
}


def group_advantages(
    rewards: torch.Tensor, group_size: int, algorithm: Algorithm, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Baseline each completion's reward against the other completions of the same prompt.

    Rows where `valid` is False (no token is trained on: a multi-turn episode whose environment
    failed) take no part in their group's mean, std or leave-one-out count, and get advantage 0:
    their reward 0 says nothing of the model, and counting it would raise its siblings'
    advantages for the environment's fault."""
    if algorithm not in GROUP_BASELINES:
        raise ValueError(
            f"spec.algorithm: {algorithm!r} is not a group estimator ({', '.join(GROUP_ALGORITHMS)})"
        )
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(
            f"spec.rollout.samplesPerPrompt: {algorithm} needs groups of at least 2 completions "
            f"dividing the batch; got group size {group_size} for {rewards.numel()} rewards"
        )
    groups = rewards.reshape(-1, group_size)
    members = (torch.ones_like(rewards) if valid is None else valid.to(rewards.dtype)).reshape(groups.shape)
    count = members.sum(dim=1, keepdim=True)
    mean = (groups * members).sum(dim=1, keepdim=True) / count.clamp(min=1)
    return (GROUP_BASELINES[algorithm](groups, mean, count, members) * members).reshape(-1)


def gae(
    token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation; the value after the last response token is 0 (episode ends).

    Masked-out tokens (padding, a multi-turn episode's observations) are skipped, not treated as
    steps: the next state of a model token is the next model token, however many observation
    tokens lie between them."""
    rewards, values = token_rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(running)
    for t in reversed(range(rewards.shape[1])):
        step = mask[:, t] > 0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = torch.where(step, delta + gamma * lam * running, running)
        next_value = torch.where(step, values[:, t], next_value)
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma * G_{t+1} over the response's model tokens (REINFORCE++'s critic-free
    return); masked-out tokens are skipped, as in `gae`."""
    rewards = token_rewards * mask
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = torch.where(mask[:, t] > 0, rewards[:, t] + gamma * running, running)
        returns[:, t] = running
    return returns * mask


def token_rewards(
    rewards: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None, kl_coef: float
) -> torch.Tensor:
    """-kl_coef * KL on every response token, plus the sequence reward on its last real token."""
    last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(dim=1)
    out = torch.zeros_like(mask, dtype=rewards.dtype)
    out[torch.arange(mask.shape[0], device=mask.device), last] = rewards
    if kl is not None and kl_coef:
        out = out - kl_coef * kl
    return out * mask


@dataclass(frozen=True)
class EstimatorInput:
    """Everything an advantage estimator may use; each takes what it needs."""

    algorithm: Algorithm
    rewards: torch.Tensor  # [B]
    mask: torch.Tensor  # [B, T], float
    group_size: int
    penalty_kl: torch.Tensor | None  # per-token KL to shape rewards with (None: no penalty)
    kl_coef: float
    values: torch.Tensor | None
    gamma: float
    lam: float


Advantages = tuple[torch.Tensor, torch.Tensor | None]  # per-token advantages, critic targets


def _ppo(x: EstimatorInput) -> Advantages:
    """KL-shaped token rewards, GAE against the critic, advantages whitened over the batch."""
    if x.values is None:
        raise ValueError("spec.algorithm: ppo needs critic values to compute GAE")
    shaped = token_rewards(x.rewards, x.mask, x.penalty_kl, x.kl_coef)
    advantages, returns = gae(shaped, x.values, x.mask, x.gamma, x.lam)
    return masked_whiten(advantages, x.mask), returns


def _reinforce_pp(x: EstimatorInput) -> Advantages:
    """REINFORCE++: KL-shaped token rewards, discounted returns, whitened over the whole batch; the
    baseline variant first subtracts each prompt group's mean reward."""
    rewards = x.rewards
    if ALGORITHMS[x.algorithm].group_baseline:
        rewards = group_advantages(rewards, x.group_size, x.algorithm, trained_rows(x.mask))
    returns = discounted_returns(token_rewards(rewards, x.mask, x.penalty_kl, x.kl_coef), x.mask, x.gamma)
    return masked_whiten(returns, x.mask), None


def _group(x: EstimatorInput) -> Advantages:
    """Group estimators: the sequence-level KL penalty is taken off the reward before baselining,
    and every token of a completion shares its sequence advantage."""
    rewards = x.rewards
    if x.penalty_kl is not None:
        rewards = rewards - x.kl_coef * masked_sum(x.penalty_kl, x.mask, dim=1)
    advantages = group_advantages(rewards, x.group_size, x.algorithm, trained_rows(x.mask))
    return advantages[:, None] * x.mask, None


def trained_rows(mask: torch.Tensor) -> torch.Tensor:
    """Rows with at least one token in the loss (all but failed episodes)."""
    return mask.sum(dim=1) > 0


ESTIMATORS: dict[Algorithm, Callable[[EstimatorInput], Advantages]] = {
    "ppo": _ppo,
    "reinforce_pp": _reinforce_pp,
    "reinforce_pp_baseline": _reinforce_pp,
    "grpo": _group,
    "dr_grpo": _group,
    "rloo": _group,
}


def compute_advantages(
    algorithm: Algorithm,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
    *,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_mode: Literal["penalty", "loss"] = "penalty",
    values: torch.Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> Advantages:
    """Per-token advantages for any algorithm, plus critic targets (returns) for ppo only.

    In "loss" KL mode the KL stays out of the rewards (it is a separate loss term, see kl_loss).
    """
    if algorithm not in ESTIMATORS:
        raise ValueError(f"spec.algorithm: unknown algorithm {algorithm!r}")
    mask = mask.to(rewards.dtype)
    penalty_kl = kl if kl_mode == "penalty" and kl is not None and kl_coef else None
    inputs = EstimatorInput(algorithm, rewards, mask, group_size, penalty_kl, kl_coef, values, gamma, lam)
    return ESTIMATORS[algorithm](inputs)


def loss_aggregation(algorithm: Algorithm) -> Aggregation:
    """How per-token losses become one number, per algorithm."""
    return ALGORITHMS[algorithm].aggregation


def aggregate(
    per_token: torch.Tensor, mask: torch.Tensor, aggregation: Aggregation, norm_len: int | None = None
) -> torch.Tensor:
    """`norm_len` (the max new tokens) is the constant divisor of seq-mean-token-sum-norm; default T."""
    if aggregation == "token-mean":
        return masked_mean(per_token, mask)
    if aggregation == "seq-mean-token-mean":
        return masked_mean(per_token, mask, dim=1).mean()
    if aggregation == "seq-mean-token-sum-norm":
        return (masked_sum(per_token, mask, dim=1) / (norm_len or per_token.shape[1])).mean()
    raise ValueError(f"unknown loss aggregation {aggregation!r}")


Correction = Literal["off", "token-clip", "token-mask", "sequence-mask"]
PolicyLevel = Literal["token", "sequence"]


def rollout_correction(
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    mask: torch.Tensor,
    correction: Correction,
    bounds: tuple[float, float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token weights for the trainer / inference mismatch, from the importance ratio
    π_train(old) / π_rollout of each sampled token: token-clip clamps it into `bounds` (truncated
    IS), token-mask keeps it only inside them (ICEPOP), sequence-mask keeps a whole completion
    only when its geometric-mean ratio is inside them. Returns (weights, filtered units)."""
    low, high = bounds
    log_ratio = (old_logp - rollout_logp).detach()
    token_ratio = log_ratio.exp()
    if correction == "token-clip":
        return token_ratio.clamp(low, high), (token_ratio < low) | (token_ratio > high)
    if correction == "token-mask":
        keep = (token_ratio >= low) & (token_ratio <= high)
    elif correction == "sequence-mask":
        sequence_ratio = masked_mean(log_ratio, mask, dim=1).exp().unsqueeze(-1)
        keep = (sequence_ratio >= low) & (sequence_ratio <= high)
    else:
        raise ValueError(f"spec.loss.rolloutCorrection.mode: unknown correction {correction!r}")
    return torch.where(keep, token_ratio, torch.zeros_like(token_ratio)), ~keep


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    aggregation: Aggregation = "token-mean",
    norm_len: int | None = None,
    *,
    dual_clip: float | None = None,
    level: PolicyLevel = "token",
    rollout_logp: torch.Tensor | None = None,
    correction: Correction = "off",
    correction_bounds: tuple[float, float] = (0.5, 5.0),
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate (negated, to minimise), with asymmetric clip ranges (DAPO's
    clip-higher) and these options:

    - `dual_clip` c > 1 (Ye et al. 2020): for negative advantages the loss is bounded by -c·A, so
      one token whose ratio exploded cannot dominate the step;
    - `level="sequence"` (GSPO): one length-normalised ratio per completion,
      exp(mean_t(logp - old_logp)), clipped as a whole; GSPO averages per sequence, so the
      aggregation is seq-mean-token-mean whatever `aggregation` says;
    - `correction` with `rollout_logp` (the engine's log-probs of the sampled tokens): token-level
      PPO weighs each token by `rollout_correction`; GSPO instead takes its ratio against the
      rollout log-probs, since they are what sampled the sequence.
    """
    mask = mask.to(logp.dtype)
    corrected = correction != "off"
    if corrected and rollout_logp is None:
        raise ValueError("spec.loss.rolloutCorrection: the correction needs the rollout's log-probs")
    raw_log_ratio = logp - old_logp
    if level == "sequence":
        base = rollout_logp if corrected and rollout_logp is not None else old_logp
        ratio = (masked_mean(logp - base, mask, dim=1).exp().unsqueeze(-1)) * mask
        aggregation = "seq-mean-token-mean"
    else:
        ratio = raw_log_ratio.clamp(-20.0, 20.0).exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * advantages
    surrogate = torch.minimum(unclipped, clipped)
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"spec.loss.dualClip: must be above 1, got {dual_clip}")
        surrogate = torch.where(advantages < 0, torch.maximum(surrogate, dual_clip * advantages), surrogate)
    per_token = -surrogate
    metrics: dict[str, float] = {}
    if corrected and level == "token" and rollout_logp is not None:
        weights, filtered = rollout_correction(old_logp, rollout_logp, mask, correction, correction_bounds)
        per_token = weights * per_token
        per_sequence = correction == "sequence-mask"
        share = filtered.float().mean() if per_sequence else masked_mean(filtered.to(mask), mask)
        metrics["rollout_filtered"] = float(share)
    if corrected and rollout_logp is not None:
        metrics["rollout_kl"] = float(masked_mean(rollout_logp - old_logp, mask))
    loss = aggregate(per_token, mask, aggregation, norm_len)
    with torch.no_grad():
        metrics["clip_fraction"] = float(masked_mean((clipped < unclipped).to(logp.dtype), mask))
        metrics["approx_kl"] = float(masked_mean(0.5 * raw_log_ratio**2, mask))
    return loss, metrics


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
) -> torch.Tensor:
    """Clipped value loss: the critic may not move more than `clip` from its rollout-time values."""
    mask = mask.to(values.dtype)
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    per_token = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return masked_mean(per_token, mask)


def kl_loss(
    logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, estimator: Estimator
) -> torch.Tensor:
    """KL to the reference as a loss term (kl.mode == "loss"), averaged over response tokens."""
    return masked_mean(kl_estimate(logp, ref_logp, estimator), mask.to(logp.dtype))


def entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the next-token distributions [B, T, V] over the masked-in tokens."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    per_token = -(logp.exp() * logp).sum(-1)
    return masked_mean(per_token, mask.to(per_token.dtype))


def adaptive_kl_coef(coef: float, kl: float, target: float, horizon: int, samples: int) -> float:
    """Ziegler et al. (2019)'s proportional controller: move the coefficient by the clipped
    relative error (at most ±20%), scaled by the share of the horizon this step's samples are."""
    error = max(-0.2, min(0.2, kl / target - 1.0))
    return coef * (1.0 + error * samples / horizon)


def overlong_penalty(lengths: torch.Tensor, max_tokens: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment per completion: 0 up to max_tokens - buffer, then linear down
    to -penalty at max_tokens, and -penalty beyond (a multi-turn episode's model tokens can exceed
    data.maxNewTokens, which bounds one turn)."""
    start = max_tokens - buffer
    return -penalty * ((lengths.float() - start).clamp(min=0, max=buffer) / buffer)


# -- offline objectives --------------------------------------------------------------------------


def sft_loss(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over the masked-in (response) tokens: [B, T] → scalar."""
    return -masked_mean(logp, mask.to(logp.dtype))


def pairwise_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """Bradley-Terry: mean of -log σ(chosen - rejected - margin) over pairs of reward scores [B]."""
    gap = chosen - rejected if margin is None else chosen - rejected - margin
    return -torch.nn.functional.logsigmoid(gap).mean()


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    ipo: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO on sequence log-probs [B]: (loss, chosen rewards, rejected rewards), the rewards being
    β · (policy - reference), detached. label_smoothing > 0 is cDPO (that share of labels assumed
    flipped); ipo regresses the log-ratio gap onto 1/(2β) instead (IPO, Azar et al. 2023)."""
    gap = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if ipo:
        losses = (gap - 1 / (2 * beta)) ** 2
    else:
        logsigmoid = torch.nn.functional.logsigmoid
        losses = -(1 - label_smoothing) * logsigmoid(beta * gap) - label_smoothing * logsigmoid(-beta * gap)
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses.mean(), chosen_rewards, rejected_rewards
