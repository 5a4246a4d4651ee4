"""A real GRPO run (local Ray, hf rollout, DeepSpeed ZeRO-2 on CPU) learns the digits toy task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from engine_specs import load, local_ray, write_spec
from kuberlhf.workers.metrics import REQUIRED_KEYS, JsonlWriter

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def ray_session():
    yield from local_ray()


def test_grpo_raises_the_mean_reward_and_reports_every_step(
    ray_session, tiny_model_dir: Path, tmp_path: Path
):
    from kuberlhf.workers.driver import Driver

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
