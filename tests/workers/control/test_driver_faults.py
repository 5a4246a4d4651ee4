"""Training faults on a real local Ray: a dead rollout engine is replaced without changing the
run's outcome, a dead trainer fails the run fast (and a rerun resumes), a hung reward times out."""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from run_specs import load, write_spec

from kuberlhf.api import RewardSpec
from kuberlhf_workers.control import checkpoint as ckpt
from kuberlhf_workers.control.driver import Driver, Outcome
from kuberlhf_workers.control.faults import StepFailed
from kuberlhf_workers.rewards.sources import reward_budget_s

pytestmark = pytest.mark.timeout(600)

STEPS = {"schedule": {"steps": 4}, "checkpoint": {"everySteps": 2, "keep": 5}}
FAST = {"actor": {"learningRate": 1e-2}, "weightSync": {"timeoutSeconds": 30}}


def test_the_reward_deadline_covers_every_attempt_and_a_servers_batches():
    assert reward_budget_s(RewardSpec(function="r.py:f", timeout_seconds=2, max_retries=1), rows=32) == 4
    server = RewardSpec(url="http://r:8000", timeout_seconds=2, max_retries=1)
    # 300 rows = 5 batches of 64, sent 4 at a time: two waves, each up to 2 attempts + one backoff.
    assert reward_budget_s(server, rows=300) == 2 * (4 + 10)



@pytest.fixture(scope="module")
def unbroken(ray_session, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    """The reference: the same spec trained without a fault."""
    folder = tmp_path_factory.mktemp("unbroken")
    spec = write_spec(folder, tiny_model_dir, **STEPS, **FAST)
    return Driver(load(spec), folder, folder / "out").run()


def _weights(checkpoint: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(checkpoint) / "model" / "model.safetensors"))


def _assert_same_run(outcome: Outcome, unbroken: Outcome, steps: list[int]) -> None:
    assert (outcome.status, outcome.step) == ("completed", 4)
    assert [h["step"] for h in outcome.history] == steps
    expected = {h["step"]: h["reward_mean"] for h in unbroken.history}
    for h in outcome.history:
        assert h["reward_mean"] == pytest.approx(expected[h["step"]], abs=1e-6), f"step {h['step']}"
    a, b = ckpt.read_state(Path(unbroken.last_checkpoint)), ckpt.read_state(Path(outcome.last_checkpoint))
    assert (b.step, b.sampler) == (a.step, a.sampler), "same data position: nothing skipped or repeated"
    final_a, final_b = _weights(unbroken.last_checkpoint), _weights(outcome.last_checkpoint)
    for name, tensor in final_a.items():
        assert torch.allclose(final_b[name], tensor, atol=1e-5), f"{name} differs"


def _kill_inside(pid: int, method: str) -> None:
    """SIGKILL the engine process as soon as Ray's process title says it runs `method`."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if f"RolloutWorker.{method}".encode() in cmdline.read_bytes():
            os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.001)


@pytest.mark.slow
def test_rollout_engines_killed_between_and_during_steps_are_replaced_and_the_run_ends_as_if_unbroken(
    unbroken: Outcome, tiny_model_dir: Path, tmp_path: Path
):
    import ray

    spec = write_spec(tmp_path, tiny_model_dir, **STEPS, **FAST)
    killed: list[Any] = []

    def kill_rollout_engines(step: int, total: int, metrics: dict, last: str | None) -> None:
        if step > 3:
            return
        killed.append(driver.rollouts[0])
        if step == 1:  # dead before step 2's rollout is submitted: its generate fails
            killed[-1].kill()
        else:  # the process crashes (as an OOM kill would) inside the next step's generation,
            # then inside a weight sync (Ray's process title says which method runs)
            pid = ray.get(killed[-1].pid())
            method = "rollout" if step == 2 else "receive_weights"
            threading.Thread(target=_kill_inside, args=(pid, method), daemon=True).start()

    driver = Driver(load(spec), tmp_path, tmp_path / "out", callbacks=[kill_rollout_engines])
    outcome = driver.run()

    _assert_same_run(outcome, unbroken, [1, 2, 3, 4])
    assert [h["rollout_restarts"] for h in outcome.history] == [0, 1, 1, 1]
    replaced = {k.actor._actor_id for k in killed}
    assert driver.rollouts[0].actor._actor_id not in replaced, "new engines took over"


@pytest.mark.slow
def test_a_killed_trainer_fails_the_run_fast_and_rerunning_resumes_from_the_last_checkpoint(
    unbroken: Outcome, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):

    from kuberlhf_workers.control import run

    spec = write_spec(tmp_path, tiny_model_dir, **STEPS, **FAST)
    out = tmp_path / "out"

    def kill_trainer_after_step_three(step: int, total: int, metrics: dict, last: str | None) -> None:
        if step == 3:
            driver.actors[0].kill()

    driver = Driver(load(spec), tmp_path, out, callbacks=[kill_trainer_after_step_three])
    started = time.monotonic()
    with pytest.raises(StepFailed) as failure:
        driver.run()
    assert time.monotonic() - started < 120, "a dead trainer must not leave the run waiting"
    message = str(failure.value)
    assert "step 4/4: actor rank 0 died" in message and "step-000002" in message, message
    assert ckpt.latest(out / "checkpoints") == ckpt.step_dir(out / "checkpoints", 2)

    # What a RayJob retry does: the same entrypoint again.
    args = argparse.Namespace(
        file=str(spec), max_steps=None, output=str(out), ray_address="local", no_resume=False, quiet=True
    )
    assert run.main(args) == 0, capsys.readouterr()
    assert "done, 4 steps" in capsys.readouterr().out
    resumed = ckpt.read_state(ckpt.latest(out / "checkpoints"))
    expected = ckpt.read_state(Path(unbroken.last_checkpoint))
    assert (resumed.step, resumed.sampler) == (expected.step, expected.sampler)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2, "the rerun trained steps 3 and 4 only"
    for name, tensor in _weights(unbroken.last_checkpoint).items():
        assert torch.allclose(_weights(str(ckpt.latest(out / "checkpoints")))[name], tensor, atol=1e-5)


@pytest.mark.slow
def test_a_hung_reward_function_fails_the_run_in_bounded_time_naming_it_and_its_timeout(
    ray_session, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    from kuberlhf_workers.control import run

    (tmp_path / "slow.py").write_text(
        "import time\n\n\ndef reward(prompts, completions, **kw):\n"
        "    time.sleep(600)\n"
        "    return [0.0] * len(prompts)\n"
    )
    spec = write_spec(
        tmp_path,
        tiny_model_dir,
        reward={"function": "slow.py:reward", "timeoutSeconds": 2, "maxRetries": 0},
        schedule={"steps": 2},
    )
    args = argparse.Namespace(
        file=str(spec),
        max_steps=None,
        output=str(tmp_path / "out"),
        ray_address="local",
        no_resume=False,
        quiet=True,
    )
    started = time.monotonic()
    code = run.main(args)
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == run.TRAINING_FAILED, err
    assert "reward function 'slow.py:reward'" in err and "within 2s" in err, err
    assert "spec.reward.timeoutSeconds" in err, err
    assert elapsed < 120, f"took {elapsed:.0f}s"
