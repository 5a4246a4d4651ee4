"""A real PPO run: critic (value head, its own DeepSpeed world), a reference model sharded over two
workers with ZeRO-3 for a KL penalty, GAE advantages; the mean reward rises and the critic's loss is
reported."""

from __future__ import annotations

from pathlib import Path

import pytest
from run_specs import load, write_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]



def test_ppo_with_critic_and_reference_raises_the_mean_reward(
    ray_session, tiny_model_dir: Path, tmp_path: Path
):
    from kuberlhf_workers.control.driver import Driver

    spec = write_spec(
        tmp_path,
        tiny_model_dir,
        algorithm="ppo",
        rollout={"samplesPerPrompt": 2, "promptsPerStep": 16},
        actor={"learningRate": 2e-2},
        critic={"zeroStage": 2, "learningRate": 1e-2, "microBatchSize": 16},
        kl={"coef": 0.01, "estimator": "k1", "mode": "penalty"},
        reference={"colocateWithActor": False, "replicas": 2, "zeroStage": 3},
        schedule={"steps": 16},
    )
    outcome = Driver(load(spec), tmp_path, tmp_path / "out").run()

    assert outcome.status == "completed"
    history = outcome.history
    rewards = [h["reward_mean"] for h in history]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.05, f"mean reward did not rise: {rewards}"
    assert all("value_loss" in h and h["value_loss"] >= 0 for h in history)
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-4), "before any update the policy is the reference"
    assert any(abs(h["kl"]) > 1e-4 for h in history[1:]), "the policy should drift from the reference"
