"""The step statistics the actor's rank 0 reports from its Experience."""

from __future__ import annotations

import torch

from kuberlhf.api import RLHFJobSpec
from kuberlhf_workers.base.samples import GenerationResult
from kuberlhf_workers.training.batch import collate
from kuberlhf_workers.training.experience import Experience, batch_metrics, make_experience


def _experience(rewards: list[float], overlong: dict[str, int] | None = None) -> Experience:
    rows = len(rewards)
    result = GenerationResult(
        prompts=["p"] * rows,
        responses=["r"] * rows,
        prompt_ids=[[1, 2]] * rows,
        response_ids=[[3, 4, 5][: 1 + i % 3] for i in range(rows)],
        response_logprobs=[[-0.5] * (1 + i % 3) for i in range(rows)],
        finished=[True] * rows,
    )
    reward: dict[str, object] = {"function": "m:f"} | ({"overlong": overlong} if overlong else {})
    spec = RLHFJobSpec.model_validate(
        {"model": {"actor": "builtin:tiny"}, "reward": reward, "rollout": {"samplesPerPrompt": 2},
         "data": {"maxNewTokens": 3}}
    )
    return make_experience(spec, collate(result, pad_id=0), torch.tensor(rewards), None, None)


def test_group_counts_name_the_groups_whose_samples_all_scored_the_same() -> None:
    exp = _experience([1.0, 1.0, 0.0, 1.0, 0.5, 0.5])
    metrics = batch_metrics(exp, samples_per_prompt=2)
    assert (metrics["groups_trained"], metrics["groups_zero_variance"]) == (3, 2)
    assert "groups_trained" not in batch_metrics(exp), "no group size, no group counts"


def test_group_counts_judge_the_reward_before_overlong_shaping() -> None:
    # Both samples of the first group score 1 but differ in length, so only the shaping differs.
    exp = _experience([1.0, 1.0, 0.0, 1.0], overlong={"bufferTokens": 2})
    assert exp.shaping is not None and exp.shaping[0] != exp.shaping[1]
    assert batch_metrics(exp, samples_per_prompt=2)["groups_zero_variance"] == 1
