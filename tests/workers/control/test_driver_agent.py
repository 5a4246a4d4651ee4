"""Multi-turn agent RL end to end (local Ray, hf and vllm episodes, DeepSpeed on CPU): the reward of
multi-turn episodes rises, held-out prompts are evaluated as episodes, and a faulty environment
fails the step naming itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from run_specs import job_dict, load

from kuberlhf_workers.control.faults import StepFailed
from kuberlhf_workers.control.metrics import JsonlWriter

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ENVS = '''
class Digits:
    """Three turns, each rewarded with the share of digits in the model's turn."""
    max_turns = 3

    def __init__(self, record):
        self.turn = 0

    def reset(self):
        return "\\n"

    async def step(self, action):
        self.turn += 1
        text = action.strip()
        reward = sum(c.isdigit() for c in text) / max(len(text), 1)
        return " next:\\n", reward, self.turn == 3


class FlatArithmetic(Digits):
    """Digits, except that arithmetic prompts score 1 a turn whatever the model says."""

    def __init__(self, record):
        super().__init__(record)
        self.flat = record["prompt"].startswith("What is")

    async def step(self, action):
        observation, reward, done = await super().step(action)
        return observation, 1.0 if self.flat else reward, done


class Broken(Digits):
    def step(self, action):
        raise ConnectionError("sandbox unreachable")
'''


def write_agent_spec(folder: Path, model_dir: Path, env_class: str, **spec: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "envs.py").write_text(ENVS)
    job = job_dict(model_dir, environment={"class": env_class, "maxTokens": 48, "timeoutSeconds": 10}, **spec)
    del job["spec"]["reward"]
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


# The same episode loop drives either engine (rollout.episodes.TurnGenerator).
ENGINES = {"hf": {"engine": "hf"}, "vllm": {"engine": "vllm", "gpuMemoryUtilization": 0.5}}


EVAL_PROMPTS = ["Count to five:", "Write a year:", "Digits please:", "Say a number:"]


def greedy_eval_reward(model_dir: str, folder: Path, spec_path: Path) -> float:
    """eval_reward_mean recomputed outside the run: the same greedy episodes on the final weights."""
    from kuberlhf_workers.base.environments import load_environment_class
    from kuberlhf_workers.control.evaluation import eval_requests
    from kuberlhf_workers.rollout.episodes import run_episodes
    from kuberlhf_workers.rollout.hf import HFBackend

    spec = load(spec_path).spec
    assert spec.environment is not None
    (request,) = eval_requests(spec, 8, [{"prompt": p} for p in EVAL_PROMPTS], 1)
    env_class = load_environment_class(spec.environment.class_, folder)
    result = run_episodes(HFBackend(model_dir), env_class, spec.environment, 3, request)
    rewards = result.episode_rewards or []
    return sum(rewards) / len(rewards)


@pytest.mark.parametrize("engine", list(ENGINES))
def test_a_multi_turn_run_raises_the_episode_reward_and_reports_its_turns(
    ray_session, tiny_model_dir: Path, tmp_path: Path, engine: str
):
    from kuberlhf_workers.control.driver import Driver

    (tmp_path / "held-out.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in EVAL_PROMPTS))
    spec = write_agent_spec(tmp_path, tiny_model_dir, "envs.py:Digits", data={"maxNewTokens": 8},
                            schedule={"steps": 8}, rollout=ENGINES[engine],
                            eval={"prompts": "held-out.jsonl", "everySteps": 4, "samplesPerPrompt": 2,
                                  "temperature": 0.0, "passThreshold": 0.5})
    metrics = tmp_path / "out" / "metrics.jsonl"
    outcome = Driver(load(spec), tmp_path, tmp_path / "out", callbacks=[JsonlWriter(metrics)]).run()

    assert outcome.status == "completed" and outcome.step == 8
    rewards = [h["reward_mean"] for h in outcome.history]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.04, f"episode reward did not rise: {rewards}"
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [line["turns_mean"] for line in lines] == [3.0] * 8
    assert {line["turns_max"] for line in lines} == {3}
    # " next:\n" after turns 1 and 2 of every episode, never trained on.
    assert all(line["observation_tokens_mean"] > 0 for line in lines)
    assert all(line["episodes_failed"] == 0 for line in lines)
    # Trainer and engine score the model's tokens alike after every weight sync: were an
    # observation token scored, or the engine left behind, the measured KL would not stay near 0.
    assert max(h["approx_kl"] for h in outcome.history) < 1e-2
    # Held-out prompts are evaluated as greedy episodes of the same environment after steps 4 and 8.
    evaluated = [h for h in outcome.history if "eval_reward_mean" in h]
    assert [h["step"] for h in evaluated] == [4, 8]
    for h in evaluated:
        assert 0.0 <= h["eval_reward_mean"] <= 3.0 and 0.0 <= h["eval_pass_at_k"] <= 1.0
        assert h["eval_episodes_failed"] == 0
    if engine == "hf":  # the same engine outside the run must find the same greedy episodes
        assert outcome.model is not None
        assert evaluated[-1]["eval_reward_mean"] == pytest.approx(
            greedy_eval_reward(outcome.model, tmp_path, spec), abs=1e-6
        )


def test_a_step_whose_episodes_fail_beyond_max_failed_share_fails_naming_the_environment(
    ray_session, tiny_model_dir: Path, tmp_path: Path
):
    from kuberlhf_workers.control.driver import Driver

    spec = write_agent_spec(tmp_path, tiny_model_dir, "envs.py:Broken", schedule={"steps": 2})
    with pytest.raises(StepFailed) as caught:
        Driver(load(spec), tmp_path, tmp_path / "out").run()
    assert str(caught.value).startswith(
        "step 1/2: EnvironmentFailed: spec.environment.class 'envs.py:Broken': 32 of 32 episodes failed, "
        "more than maxFailedShare 0.5; first error: Broken.step() raised ConnectionError: sandbox unreachable"
    )


def test_dynamic_sampling_drops_episode_groups_whose_rewards_are_all_equal(
    ray_session, tiny_model_dir: Path, tmp_path: Path
):
    from kuberlhf_workers.control.driver import Driver

    spec = write_agent_spec(
        tmp_path, tiny_model_dir, "envs.py:FlatArithmetic", data={"maxNewTokens": 8}, schedule={"steps": 2},
        rollout={"promptsPerStep": 4, "dynamicSampling": {"enabled": True, "maxRounds": 8}},
    )
    outcome = Driver(load(spec), tmp_path, tmp_path / "out").run()

    assert outcome.status == "completed"
    for h in outcome.history:  # the trainer's count, from the episodes' own rewards
        assert (h["groups_trained"], h["groups_zero_variance"], h["dynamic_groups_filled"]) == (4, 0, 0), h
        assert h["turns_mean"] == 3.0
    assert sum(h["dynamic_groups_dropped"] for h in outcome.history) > 0, "half the prompts are arithmetic"
