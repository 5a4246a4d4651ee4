"""The offline losses agree with OpenRLHF 0.11.2 on the same inputs (values made by
data/make_openrlhf_reference.py from that package), and behave as their papers say."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kuberlhf_workers.training.algorithms import dpo_loss, pairwise_loss, sft_loss

pytestmark = pytest.mark.unit

REFERENCE = json.loads((Path(__file__).parent / "data" / "openrlhf_0_11_2_offline_losses.json").read_text())


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
