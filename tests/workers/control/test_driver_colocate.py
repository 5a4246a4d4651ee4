"""Colocated placement on CPU: trainer, rollout engine and reference share one bundle, the engine
sleeps while the trainer trains and is awake again for the weight sync and the next rollout."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from run_specs import job_dict

from kuberlhf.api import parse_job

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_a_colocated_step_trains_and_the_engine_only_sleeps_during_training(
    ray_session, tiny_model_dir: Path, tmp_path: Path
) -> None:
    import ray

    from kuberlhf_workers.base.samples import GenerationRequest
    from kuberlhf_workers.control.driver import Driver

    job = parse_job(job_dict(tiny_model_dir, placement="colocate", kl={"coef": 0.01}))
    (tmp_path / "digits.py").write_text(
        "def reward(prompts, completions, **kw):\n    return [float(c.count('1')) for c in completions]\n"
    )
    driver = Driver(job, tmp_path, tmp_path / "out")
    assert {r.role for r in driver.placements.plan.ranks} == {"actor", "rollout", "reference"}
    assert {r.bundle for r in driver.placements.plan.ranks} == {0}, "all three share one bundle"
    driver.setup()
    try:
        metrics = [driver.train_step(0), driver.train_step(1)]
        engine = driver.rollouts[0]
        request = GenerationRequest(["What is 1 + 1?"], samples_per_prompt=1, max_new_tokens=4)
        ray.get(engine.rollout(request)[0])  # awake after the step's sync
        ray.get(engine.sleep())
        with pytest.raises(ray.exceptions.RayTaskError, match="while the rollout engine sleeps"):
            ray.get(engine.rollout(request)[0])
        ray.get(engine.wake_up())
        ray.get(engine.rollout(request)[0])
    finally:
        driver.release()
    for m in metrics:
        assert math.isfinite(m["reward_mean"]) and math.isfinite(m["kl"]) and m["time_sync_s"] > 0
