"""Every reward replica scores its share of a step: a reward model served by two replicas gets
half the rows each, and the trainers see the same rewards one scorer would have given."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from run_specs import job_dict

from kuberlhf.api import parse_job

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_a_reward_model_on_two_replicas_scores_half_the_rows_on_each(
    ray_session, tiny_model_dir: Path, tmp_path: Path
) -> None:
    import ray

    from kuberlhf_workers.base.samples import merge_results
    from kuberlhf_workers.control.driver import Driver
    from kuberlhf_workers.rewards.model import RewardModelScorer, train_tiny_reward_model

    reward_model = train_tiny_reward_model(tmp_path / "rm", tiny_model_dir)
    job = parse_job(
        job_dict(
            tiny_model_dir,
            reward={"function": None, "model": str(reward_model), "replicas": 2},
            rollout={"promptsPerStep": 6, "samplesPerPrompt": 3},
            actor={"microBatchSize": 6},
        )
    )
    driver = Driver(job, tmp_path, tmp_path / "out")
    driver.setup()
    try:
        pending = driver._generate(0)
        records, rollout = pending.records, merge_results(ray.get(pending.refs))
        shares = [w.score(pending.refs, records, 3, i, 2) for i, w in enumerate(driver.rewards)]
        scores = [s for part in ray.get(shares) for s in part]
        counts = ray.get([w.scored() for w in driver.rewards])
        metrics = driver.train_step(1)
        after = ray.get([w.scored() for w in driver.rewards])
    finally:
        driver.release()
    assert counts == [9, 9], "each replica scores half of the 18 rows"
    assert [a - c for a, c in zip(after, counts, strict=True)] == [9, 9], "a training step spreads over both"
    alone = RewardModelScorer(reward_model)(rollout.prompts, rollout.responses)
    assert torch.allclose(torch.tensor(scores), torch.tensor(alone), atol=1e-5)
    assert math.isfinite(metrics["reward_mean"])
