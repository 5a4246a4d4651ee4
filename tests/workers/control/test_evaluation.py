"""Online evaluation's arithmetic: the mean reward and pass@k of held-out prompts (pure)."""

from __future__ import annotations

import pytest

from kuberlhf_workers.control.evaluation import eval_metrics

pytestmark = pytest.mark.unit


def test_pass_at_k_counts_prompts_with_any_passing_sample() -> None:
    metrics = eval_metrics([0.0, 1.0, 0.0, 0.2, 0.3, 0.0], samples_per_prompt=3, threshold=1.0)
    assert metrics == {"eval_reward_mean": pytest.approx(0.25), "eval_pass_at_k": 0.5}
