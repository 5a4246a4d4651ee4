"""Real GRPO runs (local Ray, hf rollout, DeepSpeed ZeRO-2 on CPU) learn the digits toy task,
synchronously and one step off-policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from run_specs import load, write_spec

from kuberlhf_workers.control import checkpoint as ckpt
from kuberlhf_workers.control.metrics import REQUIRED_KEYS, JsonlWriter

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_grpo_raises_the_mean_reward_and_reports_every_step(
    ray_session, tiny_model_dir: Path, tmp_path: Path
):
    from kuberlhf_workers.control.driver import Driver

    spec = write_spec(tmp_path, tiny_model_dir, actor={"learningRate": 1e-2}, schedule={"steps": 10})
    seen: list[tuple[int, int, str | None]] = []
    driver = Driver(
        load(spec),
        tmp_path,
        tmp_path / "out",
        callbacks=[
            JsonlWriter(tmp_path / "out" / "metrics.jsonl"),
            lambda step, total, metrics, last: seen.append((step, total, last)),
        ],
    )
    outcome = driver.run()

    assert outcome.status == "completed" and outcome.step == 10
    rewards = [h["reward_mean"] for h in outcome.history]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.05, f"mean reward did not rise: {rewards}"
    assert [s for s, _, _ in seen] == list(range(1, 11)) and {t for _, t, _ in seen} == {10}
    assert (
        seen[-1][2] == outcome.last_checkpoint
        and (Path(outcome.last_checkpoint) / "model" / "config.json").is_file()
    )
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 11))
    for line in lines:
        missing = [k for k in REQUIRED_KEYS if line.get(k) is None]
        assert not missing, f"step {line['step']} lacks {missing}"
        assert line["samples_per_second"] > 0 and line["response_length_mean"] > 0
        assert line["policy_lag"] == 0, "synchronous training samples with the trainer's weights"


@pytest.fixture(scope="module")
def async_run(ray_session, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """GRPO one step off-policy: (spec path, outcome of an unbroken 10-step run)."""
    from kuberlhf_workers.control.driver import Driver

    folder = tmp_path_factory.mktemp("async")
    spec = write_spec(
        folder,
        tiny_model_dir,
        actor={"learningRate": 1e-2},
        rollout={"offPolicySteps": 1},
        schedule={"steps": 10},
        checkpoint={"everySteps": 100},
    )
    return spec, Driver(load(spec), folder, folder / "unbroken").run()


def test_async_grpo_one_step_off_policy_learns_and_reports_how_stale_its_rollouts_were(async_run):
    _, outcome = async_run
    assert outcome.status == "completed" and [h["step"] for h in outcome.history] == list(range(1, 11))
    rewards = [h["reward_mean"] for h in outcome.history]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.05, f"mean reward did not rise: {rewards}"
    # Step 1 samples with the initial weights; every later rollout was generated while the
    # previous step trained, so with weights exactly one update old.
    assert [h["policy_lag"] for h in outcome.history] == [0] + [1] * 9
    assert all(h["rollout_tokens"] > 0 for h in outcome.history)


def test_async_grpo_stopped_and_resumed_ends_exactly_like_an_unbroken_run(async_run, tmp_path: Path):
    from safetensors.torch import load_file

    from kuberlhf_workers.control.driver import Driver

    spec, unbroken = async_run

    def stop_at_four(step: int, total: int, metrics: dict, last: str | None) -> None:
        if step == 4:
            stopping.request_stop()

    stopping = Driver(load(spec), spec.parent, tmp_path / "run", callbacks=[stop_at_four])
    assert stopping.run().step == 4
    saved = ckpt.latest(tmp_path / "run" / "checkpoints")
    assert [r["step"] for r in ckpt.read_rollouts_ahead(saved)] == [4], "step 5's rollout was already made"
    resumed = Driver(load(spec), spec.parent, tmp_path / "run").run()

    assert [h["step"] for h in resumed.history] == list(range(5, 11))
    assert [h["policy_lag"] for h in resumed.history] == [1] * 6, "the saved rollout was trained on"
    for before, after in zip(unbroken.history[4:], resumed.history, strict=True):
        assert after["reward_mean"] == pytest.approx(before["reward_mean"], abs=1e-6), after["step"]
    a, b = ckpt.read_state(Path(unbroken.last_checkpoint)), ckpt.read_state(Path(resumed.last_checkpoint))
    assert (a.step, a.sampler) == (b.step, b.sampler)
    final_a = load_file(str(Path(unbroken.last_checkpoint) / "model" / "model.safetensors"))
    final_b = load_file(str(Path(resumed.last_checkpoint) / "model" / "model.safetensors"))
    for name, tensor in final_a.items():
        assert torch.allclose(final_b[name], tensor, atol=1e-5), f"{name} differs after resume"


@pytest.mark.parametrize(
    ("loss", "learns"),
    [
        ({"dualClip": 3.0, "rolloutCorrection": {"mode": "token-mask", "low": 0.5, "high": 2.0}}, True),
        (
            {"policyLossType": "gspo", "clipRange": 0.001, "rolloutCorrection": {"mode": "sequence-mask"}},
            False,
        ),
    ],
    ids=["dual-clip-icepop", "gspo-sequence-mask"],
)
def test_the_2026_policy_losses_train_and_report_the_trainer_rollout_mismatch(
    ray_session, tiny_model_dir: Path, tmp_path: Path, loss: dict, learns: bool
):
    from kuberlhf_workers.control.driver import Driver

    steps = 10 if learns else 3
    spec = write_spec(
        tmp_path, tiny_model_dir, actor={"learningRate": 1e-2}, schedule={"steps": steps}, loss=loss
    )
    outcome = Driver(load(spec), tmp_path, tmp_path / "out").run()
    assert outcome.status == "completed" and outcome.step == steps
    for row in outcome.history:
        # The trainer recomputed the old log-probs itself; on CPU in fp32 it agrees with the engine.
        assert abs(row["rollout_kl"]) < 0.05 and 0.0 <= row.get("rollout_filtered", 0.0) < 0.5, row
    if learns:
        rewards = [h["reward_mean"] for h in outcome.history]
        assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.05, rewards


def test_adaptive_kl_entropy_bonus_and_overlong_shaping_act_and_the_coefficient_is_checkpointed(
    ray_session, tiny_model_dir: Path, tmp_path: Path
):
    from kuberlhf_workers.control import checkpoint as ckpt
    from kuberlhf_workers.control.driver import Driver

    spec = write_spec(
        tmp_path,
        tiny_model_dir,
        actor={"learningRate": 1e-2},
        schedule={"steps": 3},
        checkpoint={"everySteps": 2},
        kl={"coef": 0.05, "target": 1e-4, "horizon": 64},
        loss={"entropyCoef": 0.01},
        reward={"function": "digits.py:reward", "overlong": {"bufferTokens": 8, "penalty": 1.0}},
    )
    outcome = Driver(load(spec), tmp_path, tmp_path / "out").run()
    coefs = [h["kl_coef"] for h in outcome.history]
    assert coefs[0] == pytest.approx(0.05) and coefs[1] != coefs[0], coefs
    assert all(h["entropy"] > 0 for h in outcome.history)
    assert all(h["overlong_penalty_mean"] <= 0 for h in outcome.history)
    assert any(h["overlong_penalty_mean"] < 0 for h in outcome.history), "16-token replies reach the ramp"
    state = ckpt.read_state(tmp_path / "out" / "checkpoints" / "step-000002")
    assert state.extra["kl_coef"] == pytest.approx(coefs[2]), "resume must continue with the adapted value"


def test_held_out_prompts_are_evaluated_every_n_steps_and_at_the_end_with_pass_at_k(
    ray_session, tiny_model_dir: Path, tmp_path: Path
):
    from kuberlhf_workers.control.driver import Driver

    (tmp_path / "held-out.jsonl").write_text(
        "".join(json.dumps({"prompt": f"Write {n} digits:"}) + "\n" for n in range(2, 8))
    )
    spec = write_spec(
        tmp_path,
        tiny_model_dir,
        actor={"learningRate": 1e-2},
        schedule={"steps": 3},
        eval={"prompts": "held-out.jsonl", "everySteps": 2, "samplesPerPrompt": 3, "passThreshold": 0.3},
    )
    outcome = Driver(load(spec), tmp_path, tmp_path / "out").run()
    evaluated = [h["step"] for h in outcome.history if "eval_pass_at_k" in h]
    assert evaluated == [2, 3], "every 2 steps and at the end"
    for row in outcome.history:
        if "eval_pass_at_k" in row:
            assert 0.0 <= row["eval_pass_at_k"] <= 1.0 and 0.0 <= row["eval_reward_mean"] <= 1.0
