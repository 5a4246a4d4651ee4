"""Every estimator and loss against values worked out by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from kuberlhf_workers.training.algorithms import (
    compute_advantages,
    discounted_returns,
    gae,
    group_advantages,
    kl_estimate,
    kl_loss,
    loss_aggregation,
    masked_mean,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)

pytestmark = pytest.mark.unit


def t(rows: list) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def close(actual: torch.Tensor | float, expected: list | float, tol: float = 1e-5) -> None:
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64), t(expected), atol=tol, rtol=0)


def test_masked_mean_ignores_padding_and_handles_empty_rows() -> None:
    x, mask = t([[1, 2, 3], [4, 5, 6]]), t([[1, 1, 0], [1, 0, 0]])
    close(masked_mean(x, mask), 7 / 3)  # (1 + 2 + 4) / 3
    close(masked_mean(x, mask, dim=1), [1.5, 4.0])
    close(masked_mean(t([[5, 5]]), t([[0, 0]]), dim=1), [0.0])


def test_masked_whiten_uses_only_real_tokens() -> None:
    # real values 1, 2, 3: mean 2, population variance 2/3, so 1 -> -sqrt(1.5)
    out = masked_whiten(t([[1, 2, 100], [3, 0, 0]]), t([[1, 1, 0], [1, 0, 0]]))
    close(out, [[-math.sqrt(1.5), 0, 0], [math.sqrt(1.5), 0, 0]])


def test_kl_estimators_match_schulman() -> None:
    logp, ref = t([-1.0, -2.0]), t([-1.5, -1.0])  # log ratio 0.5, -1
    close(kl_estimate(logp, ref, "k1"), [0.5, -1.0])
    close(kl_estimate(logp, ref, "k2"), [0.125, 0.5])
    # k3 = exp(ref - logp) - (ref - logp) - 1: e^-0.5 + 0.5 - 1, e^1 - 1 - 1
    close(kl_estimate(logp, ref, "k3"), [math.exp(-0.5) - 0.5, math.e - 2])
    assert torch.isfinite(kl_estimate(t([0.0]), t([-500.0]), "k3")).all()
    with pytest.raises(ValueError, match=r"spec\.kl\.estimator: got 'k4'"):
        kl_estimate(logp, ref, "k4")  # type: ignore[arg-type]


REWARDS = t([1, 0, 1, 0, 2, 2, 2, 2])  # two prompts, four samples each


def test_grpo_normalises_by_group_std() -> None:
    # group 1: mean 0.5, unbiased std sqrt(1/3); group 2 has no spread, so no signal
    a = 0.5 / math.sqrt(1 / 3)
    close(group_advantages(REWARDS, 4, "grpo"), [a, -a, a, -a, 0, 0, 0, 0])


def test_dr_grpo_and_reinforce_pp_baseline_only_subtract_the_group_mean() -> None:
    for algorithm in ("dr_grpo", "reinforce_pp_baseline"):
        close(group_advantages(REWARDS, 4, algorithm), [0.5, -0.5, 0.5, -0.5, 0, 0, 0, 0])


def test_rloo_uses_the_mean_of_the_other_samples() -> None:
    # reward 1 vs others (0+1+0)/3 -> 2/3; reward 0 vs others (1+1+0)/3 -> -2/3
    close(group_advantages(REWARDS, 4, "rloo"), [2 / 3, -2 / 3, 2 / 3, -2 / 3, 0, 0, 0, 0])


def test_a_failed_episode_takes_no_part_in_its_groups_baseline() -> None:
    # Group 1: rewards 1, 0, 1 and a failed episode (reward 0, no token trained on). Counted, the
    # failure would pull the mean to 0.5 and give the siblings +-0.5; left out, the mean is 2/3.
    rewards = t([1, 0, 1, 0, 2, 2, 2, 2])
    mask = t([[1, 1]] * 3 + [[0, 0]] + [[1, 1]] * 4)
    dr, _ = compute_advantages("dr_grpo", rewards, mask, 4)
    close(dr[:, 0], [1 / 3, -2 / 3, 1 / 3, 0, 0, 0, 0, 0])
    # rloo: 1 vs the other members (0+1)/2 -> 1/2; 0 vs (1+1)/2 -> -1
    rloo, _ = compute_advantages("rloo", rewards, mask, 4)
    close(rloo[:, 0], [0.5, -1, 0.5, 0, 0, 0, 0, 0])
    # grpo: unbiased std of 1, 0, 1 is sqrt(1/3)
    grpo, _ = compute_advantages("grpo", rewards, mask, 4)
    s = math.sqrt(1 / 3)
    close(grpo[:, 0], [1 / 3 / s, -2 / 3 / s, 1 / 3 / s, 0, 0, 0, 0, 0])
    # A group whose every episode failed has no baseline and no signal (and no NaN).
    everyone = compute_advantages("grpo", rewards, torch.zeros_like(mask), 4)[0]
    assert torch.equal(everyone, torch.zeros_like(mask))


def test_group_advantages_reject_bad_groups() -> None:
    with pytest.raises(ValueError, match="samplesPerPrompt"):
        group_advantages(REWARDS, 1, "grpo")
    with pytest.raises(ValueError, match="samplesPerPrompt"):
        group_advantages(REWARDS, 3, "grpo")
    with pytest.raises(ValueError, match="not a group estimator"):
        group_advantages(REWARDS, 4, "ppo")


def test_gae_by_hand_with_padding() -> None:
    rewards = t([[0, 0, 1], [0, 2, 9]])
    values = t([[0.5, 0.6, 0.7], [1.0, 0.5, 9]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    # gamma 0.9, lam 0.8 (gamma*lam = 0.72); row 1:
    #   t2: delta = 1 - 0.7 = 0.3;            A = 0.3
    #   t1: delta = 0.9*0.7 - 0.6 = 0.03;     A = 0.03 + 0.72*0.3 = 0.246
    #   t0: delta = 0.9*0.6 - 0.5 = 0.04;     A = 0.04 + 0.72*0.246 = 0.21712
    # row 2 (t2 is padding, so the episode ends after t1):
    #   t1: delta = 2 - 0.5 = 1.5;            A = 1.5
    #   t0: delta = 0.9*0.5 - 1.0 = -0.55;    A = -0.55 + 0.72*1.5 = 0.53
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    close(advantages, [[0.21712, 0.246, 0.3], [0.53, 1.5, 0]])
    close(returns, [[0.71712, 0.846, 1.0], [1.53, 2.0, 0]])


def test_discounted_returns_by_hand() -> None:
    returns = discounted_returns(t([[1, 0, 2], [3, 1, 9]]), t([[1, 1, 1], [1, 1, 0]]), gamma=0.5)
    close(returns, [[1.5, 1.0, 2.0], [3.5, 1.0, 0]])  # 1 + 0.5*(0 + 0.5*2); 3 + 0.5*1


def test_token_rewards_put_the_reward_on_the_last_real_token() -> None:
    kl = t([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    out = token_rewards(t([1.0, 2.0]), t([[1, 1, 1], [1, 1, 0]]), kl, kl_coef=0.5)
    close(out, [[-0.05, -0.1, 0.85], [-0.2, 1.75, 0]])


MASK2 = t([[1, 1], [1, 0]])
KL2 = t([[0.2, 0.2], [0.0, 9.0]])  # sequence KL sums: 0.4 and 0 (9 is padding)


def test_group_estimators_take_the_kl_penalty_off_the_reward() -> None:
    # penalised rewards: 1 - 0.5*0.4 = 0.8 and 0 - 0 = 0; group mean 0.4
    kw = {"kl": KL2, "kl_coef": 0.5}
    dr, _ = compute_advantages("dr_grpo", t([1.0, 0.0]), MASK2, 2, **kw)
    close(dr, [[0.4, 0.4], [-0.4, 0]])
    rloo, _ = compute_advantages("rloo", t([1.0, 0.0]), MASK2, 2, **kw)
    close(rloo, [[0.8, 0.8], [-0.8, 0]])
    grpo, returns = compute_advantages("grpo", t([1.0, 0.0]), MASK2, 2, **kw)
    a = 0.4 / math.sqrt(0.32)  # unbiased std of (0.8, 0): sqrt(0.4^2 + 0.4^2)
    close(grpo, [[a, a], [-a, 0]])
    assert returns is None


def test_kl_in_loss_mode_leaves_rewards_alone() -> None:
    adv, _ = compute_advantages("dr_grpo", t([1.0, 0.0]), MASK2, 2, kl=KL2, kl_coef=0.5, kl_mode="loss")
    close(adv, [[0.5, 0.5], [-0.5, 0]])


def test_reinforce_pp_whitens_discounted_returns_globally() -> None:
    # returns [[1, 1], [3, -]]: mean 5/3, population std sqrt(8/9)
    adv, returns = compute_advantages("reinforce_pp", t([1.0, 3.0]), MASK2, 2)
    s = math.sqrt(8 / 9)
    close(adv, [[(1 - 5 / 3) / s, (1 - 5 / 3) / s], [(3 - 5 / 3) / s, 0]])
    assert returns is None


def test_reinforce_pp_baseline_subtracts_group_mean_then_whitens() -> None:
    # baselined rewards -1, 1; returns with gamma 0.5: [[-0.5, -1], [1, -]]
    # mean -1/6, population variance 0.722222 (std 0.849837)
    adv, _ = compute_advantages("reinforce_pp_baseline", t([1.0, 3.0]), MASK2, 2, gamma=0.5)
    close(adv, [[-0.392232, -0.980581], [1.372813, 0]])


def test_ppo_shapes_rewards_with_kl_and_runs_gae() -> None:
    # token rewards: [-0.5*0.2, 1 - 0.5*0.4] = [-0.1, 0.8]; gamma = lam = 1:
    # A1 = 0.8 - 0.25 = 0.55, A0 = -0.1 + 0.8 - 0.5 = 0.2; returns = A + V = [0.7, 0.8]
    # whitened: mean 0.375, std 0.175 -> [-1, 1]
    adv, returns = compute_advantages(
        "ppo",
        t([1.0]),
        t([[1, 1]]),
        1,
        kl=t([[0.2, 0.4]]),
        kl_coef=0.5,
        values=t([[0.5, 0.25]]),
        gamma=1.0,
        lam=1.0,
    )
    close(adv, [[-1, 1]], tol=1e-4)
    assert returns is not None
    close(returns, [[0.7, 0.8]])
    with pytest.raises(ValueError, match="critic values"):
        compute_advantages("ppo", t([1.0]), t([[1, 1]]), 1)


# Four tokens, clip 0.2: ratio 1 (A=1); ratio e^0.5 (A=2, clipped to 1.2); ratio e^-0.5
# (A=-1, clipped to 0.8); ratio e^0.5 with A=-1 (outside the range but the unclipped term is the
# pessimistic one, so no clipping). Per-token losses: -1, -2.4, 0.8, e^0.5.
LOGP = t([[0.0, 0.5, -0.5, 0.5]])
ADV = t([[1.0, 2.0, -1.0, -1.0]])
LOSSES = [-1.0, -2.4, 0.8, math.exp(0.5)]


def test_policy_loss_clips_only_where_the_surrogate_is_pessimistic() -> None:
    loss, metrics = policy_loss(LOGP, torch.zeros_like(LOGP), ADV, t([[1, 1, 1, 1]]), 0.2, 0.2)
    close(loss, sum(LOSSES) / 4)
    close(metrics["clip_fraction"], 0.5)
    close(metrics["approx_kl"], 0.5 * 0.25 * 3 / 4)


def test_policy_loss_gradient_vanishes_on_clipped_tokens() -> None:
    logp = LOGP.clone().requires_grad_(True)
    loss, _ = policy_loss(logp, torch.zeros_like(LOGP), ADV, t([[1, 1, 1, 1]]), 0.2, 0.2)
    loss.backward()
    # d/dlogp of -ratio*A/4 = -ratio*A/4 where unclipped
    close(logp.grad, [[-0.25, 0.0, 0.0, math.exp(0.5) / 4]])


def test_policy_loss_ignores_padding_and_supports_clip_higher() -> None:
    logp, adv = t([[0.0, 0.5, 7.0]]), t([[1.0, 2.0, 100.0]])
    loss, metrics = policy_loss(logp, torch.zeros_like(logp), adv, t([[1, 1, 0]]), 0.2, 0.28)
    close(loss, (-1 - 2.56) / 2)  # upper clip 1.28 * 2
    close(metrics["clip_fraction"], 0.5)


def test_loss_aggregations_by_hand() -> None:
    # sequence 1: tokens 0, 1 of LOGP (losses -1, -2.4) + padding
    # sequence 2: tokens 2, 3, 0 (losses 0.8, e^0.5, -1)
    logp = t([[0.0, 0.5, 3.0], [-0.5, 0.5, 0.0]])
    adv = t([[1.0, 2.0, 5.0], [-1.0, -1.0, 1.0]])
    mask = t([[1, 1, 0], [1, 1, 1]])
    old = torch.zeros_like(logp)
    seq2 = 0.8 + math.exp(0.5) - 1
    loss, metrics = policy_loss(logp, old, adv, mask, 0.2, 0.2, "token-mean")
    close(loss, (-3.4 + seq2) / 5)
    close(metrics["clip_fraction"], 2 / 5)
    loss, _ = policy_loss(logp, old, adv, mask, 0.2, 0.2, "seq-mean-token-mean")
    close(loss, (-3.4 / 2 + seq2 / 3) / 2)
    loss, _ = policy_loss(logp, old, adv, mask, 0.2, 0.2, "seq-mean-token-sum-norm", norm_len=4)
    close(loss, (-3.4 / 4 + seq2 / 4) / 2)


def test_loss_aggregation_per_algorithm() -> None:
    assert loss_aggregation("dr_grpo") == "seq-mean-token-sum-norm"
    assert loss_aggregation("grpo") == "seq-mean-token-mean"
    for algorithm in ("ppo", "rloo", "reinforce_pp", "reinforce_pp_baseline"):
        assert loss_aggregation(algorithm) == "token-mean"


def test_value_loss_is_clipped_pessimistically() -> None:
    # old 1.0, clip 0.2:
    #   v 1.1, R 2: inside the clip range -> 0.5 * 0.81 = 0.405
    #   v 1.5, R 2: clipped 1.2 is further from R -> 0.5 * 0.64 = 0.32
    #   v 1.5, R 1: unclipped is further -> 0.5 * 0.25 = 0.125; last token is padding
    values, old = t([[1.1, 1.5, 1.5, 50.0]]), t([[1.0, 1.0, 1.0, 0.0]])
    returns, mask = t([[2.0, 2.0, 1.0, -50.0]]), t([[1, 1, 1, 0]])
    close(value_loss(values, old, returns, mask, clip=0.2), (0.405 + 0.32 + 0.125) / 3)


def test_kl_loss_averages_the_estimator_over_real_tokens() -> None:
    logp, ref, mask = t([[-1.0, -2.0, 5.0]]), t([[-1.5, -1.0, 0.0]]), t([[1, 1, 0]])
    close(kl_loss(logp, ref, mask, "k1"), (0.5 - 1.0) / 2)
    close(kl_loss(logp, ref, mask, "k3"), (math.exp(-0.5) - 0.5 + math.e - 2) / 2)


# -- entropy bonus, adaptive KL, overlong shaping ------------------------------------------------


def test_entropy_is_log_v_for_uniform_logits_and_zero_for_certain_ones() -> None:
    from kuberlhf_workers.training.algorithms import entropy

    mask = torch.ones(1, 2)
    assert float(entropy(torch.zeros(1, 2, 8), mask)) == pytest.approx(math.log(8))
    certain = torch.full((1, 2, 8), -1e4)
    certain[..., 3] = 0.0
    assert float(entropy(certain, mask)) == pytest.approx(0.0, abs=1e-6)


def test_the_adaptive_kl_coefficient_rises_above_target_falls_below_and_moves_at_most_20_percent() -> None:
    from kuberlhf_workers.training.algorithms import adaptive_kl_coef

    assert adaptive_kl_coef(0.1, kl=0.2, target=0.1, horizon=100, samples=100) == pytest.approx(0.12)
    assert adaptive_kl_coef(0.1, kl=0.09, target=0.1, horizon=100, samples=100) == pytest.approx(0.09)
    assert adaptive_kl_coef(0.1, kl=0.01, target=0.1, horizon=100, samples=100) == pytest.approx(0.08)
    assert adaptive_kl_coef(0.1, kl=0.1, target=0.1, horizon=100, samples=100) == pytest.approx(0.1)
    assert adaptive_kl_coef(0.1, kl=5.0, target=0.1, horizon=1000, samples=100) == pytest.approx(0.102)


def test_overlong_penalty_is_zero_before_the_buffer_then_falls_linearly_to_the_penalty() -> None:
    from kuberlhf_workers.training.algorithms import overlong_penalty

    lengths = torch.tensor([10, 24, 28, 32])
    assert overlong_penalty(lengths, max_tokens=32, buffer=8, penalty=1.0).tolist() == [0.0, 0.0, -0.5, -1.0]


def test_overlong_penalty_is_dapos_length_reward_at_every_length() -> None:
    from kuberlhf_workers.training.algorithms import overlong_penalty

    def dapo(length: int, l_max: int, l_cache: int) -> float:  # DAPO (Yu et al. 2025), R_length
        if length <= l_max - l_cache:
            return 0.0
        if length <= l_max:
            return (l_max - l_cache - length) / l_cache
        return -1.0

    lengths = torch.arange(0, 50)
    got = overlong_penalty(lengths, max_tokens=32, buffer=8, penalty=1.0)
    assert got.tolist() == pytest.approx([dapo(n, 32, 8) for n in range(50)], abs=1e-7)
    scaled = overlong_penalty(lengths, max_tokens=32, buffer=8, penalty=0.5)
    assert scaled.tolist() == pytest.approx([0.5 * dapo(n, 32, 8) for n in range(50)], abs=1e-7)


def test_gae_skips_observation_tokens_as_if_the_models_tokens_were_contiguous() -> None:
    rewards = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 9.0, 9.0, 0.25, 0.75]])
    gapped = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0]])  # two observation tokens after the first
    advantages, returns = gae(rewards, values, gapped, gamma=0.9, lam=0.8)
    compact, compact_returns = gae(
        torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.25, 0.75]]), torch.ones(1, 3), 0.9, 0.8
    )
    assert advantages[0, [1, 2]].tolist() == [0.0, 0.0]
    torch.testing.assert_close(advantages[0, [0, 3, 4]], compact[0])
    torch.testing.assert_close(returns[0, [0, 3, 4]], compact_returns[0])


def test_a_group_estimator_puts_the_episodes_advantage_on_every_model_token_only() -> None:
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, _ = compute_advantages("rloo", torch.tensor([1.0, 0.0]), mask, 2)
    # rloo, groups of 2: r_i minus the other's reward
    assert advantages.tolist() == [[1.0, 0.0, 1.0], [-1.0, -1.0, 0.0]]
