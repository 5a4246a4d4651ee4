"""The offline losses agree with OpenRLHF 0.11.2 on the same inputs (values made by
data/make_openrlhf_reference.py from that package), and behave as their papers say."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kuberlhf_workers.training.algorithms import dpo_loss, pairwise_loss, sft_loss

pytestmark = pytest.mark.unit

REFERENCE = json.loads((Path(__file__).parent / "data" / "openrlhf_0_11_2_losses.json").read_text())


def t(values: list) -> torch.Tensor:  # type: ignore[type-arg]
    return torch.tensor(values, dtype=torch.float64)


def test_sft_loss_equals_openrlhf_sftloss_on_the_same_token_logprobs() -> None:
    case = REFERENCE["sft"]
    assert float(sft_loss(t(case["logp"]), t(case["mask"]))) == pytest.approx(case["loss"], rel=1e-12)


def test_sft_loss_ignores_masked_out_prompt_and_padding_tokens() -> None:
    logp = t([[-100.0, -1.0, -3.0]])
    assert float(sft_loss(logp, t([[0, 1, 1]]))) == pytest.approx(2.0)


def test_pairwise_loss_equals_openrlhf_pairwiseloss_with_and_without_margin() -> None:
    case = REFERENCE["pairwise"]
    chosen, rejected, margin = t(case["chosen"]), t(case["rejected"]), t(case["margin"])
    assert float(pairwise_loss(chosen, rejected)) == pytest.approx(case["loss"], rel=1e-12)
    assert float(pairwise_loss(chosen, rejected, margin)) == pytest.approx(
        case["loss_with_margin"], rel=1e-12
    )


def test_pairwise_loss_is_log2_for_a_tie_and_falls_as_chosen_wins() -> None:
    zero = torch.zeros(3)
    assert float(pairwise_loss(zero, zero)) == pytest.approx(0.693147, abs=1e-6)
    assert float(pairwise_loss(zero + 2, zero)) < float(pairwise_loss(zero + 1, zero))


@pytest.mark.parametrize("index", range(len(REFERENCE["dpo"]["results"])))
def test_dpo_loss_equals_openrlhf_dpoloss_for_dpo_cdpo_and_ipo(index: int) -> None:
    case = REFERENCE["dpo"]
    want = case["results"][index]
    loss, chosen, rejected = dpo_loss(
        t(case["policy_chosen"]),
        t(case["policy_rejected"]),
        t(case["ref_chosen"]),
        t(case["ref_rejected"]),
        want["beta"],
        want["label_smoothing"],
        want["ipo"],
    )
    assert float(loss) == pytest.approx(want["loss"], rel=1e-12)
    assert chosen.tolist() == pytest.approx(want["chosen_rewards"], rel=1e-12)
    assert rejected.tolist() == pytest.approx(want["rejected_rewards"], rel=1e-12)


def test_dpo_gradients_raise_chosen_and_lower_rejected_log_probs() -> None:
    chosen = torch.tensor([-5.0], requires_grad=True)
    rejected = torch.tensor([-5.0], requires_grad=True)
    loss, _, _ = dpo_loss(chosen, rejected, torch.tensor([-5.0]), torch.tensor([-5.0]), beta=0.1)
    loss.backward()
    assert chosen.grad is not None and rejected.grad is not None
    assert float(chosen.grad) < 0 < float(rejected.grad)


# -- the policy loss and its 2026 options, against OpenRLHF's PolicyLoss ----------------------------

POLICY = REFERENCE["policy"]
CORRECTIONS = {
    ("token", "clip"): "token-clip",
    ("token", "mask"): "token-mask",
    ("seq", "mask"): "sequence-mask",
}


@pytest.mark.parametrize(
    "case",
    POLICY["results"],
    ids=lambda c: (
        f"{c.get('policy_loss_type', 'ppo')}-{c.get('correction', 'off')}"
        f"-dual{c.get('dual_clip')}-token{c.get('token_level_loss', True)}"
    ),
)
def test_policy_loss_equals_openrlhf_policyloss_for_ppo_dual_clip_gspo_and_rollout_corrections(
    case: dict,  # type: ignore[type-arg]
) -> None:
    from kuberlhf_workers.training.algorithms import policy_loss

    correction = CORRECTIONS[tuple(case["correction"])] if "correction" in case else "off"
    loss, metrics = policy_loss(
        t(POLICY["logp"]),
        t(POLICY["old_logp"]),
        t(POLICY["advantages"]),
        t(POLICY["mask"]),
        case["clip"][0],
        case["clip"][1],
        "token-mean" if case.get("token_level_loss", True) else "seq-mean-token-mean",
        dual_clip=case.get("dual_clip"),
        level="sequence" if case.get("policy_loss_type") == "gspo" else "token",
        rollout_logp=t(POLICY["rollout_logp"]),
        correction=correction,  # type: ignore[arg-type]
        correction_bounds=tuple(case.get("bounds", (0.5, 5.0))),  # type: ignore[arg-type]
    )
    # OpenRLHF divides each sequence's sum by its token count + 1e-8: equal to ~1e-8, relatively.
    assert float(loss) == pytest.approx(case["loss"], rel=1e-7)
    assert metrics["clip_fraction"] == pytest.approx(case["clip_ratio"], rel=1e-10)
    if case["filtered"] is not None:
        assert metrics["rollout_filtered"] == pytest.approx(case["filtered"], rel=1e-10)


def test_dual_clip_bounds_the_loss_of_a_negative_advantage_token_whose_ratio_exploded() -> None:
    from kuberlhf_workers.training.algorithms import policy_loss

    logp, old = torch.tensor([[2.0]]), torch.tensor([[0.0]])  # ratio e^2 ≈ 7.4
    advantages, mask = torch.tensor([[-1.0]]), torch.ones(1, 1)
    plain, _ = policy_loss(logp, old, advantages, mask, 0.2, 0.2)
    bounded, _ = policy_loss(logp, old, advantages, mask, 0.2, 0.2, dual_clip=3.0)
    assert float(plain) == pytest.approx(7.389, abs=1e-3) and float(bounded) == pytest.approx(3.0)
