"""A real GRPO run with rollout.dynamicSampling (local Ray, hf rollout, DeepSpeed on CPU): the trainer
sees full batches without a single prompt group whose rewards are all equal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from run_specs import load, write_spec

from kuberlhf_workers.control import checkpoint as ckpt
from kuberlhf_workers.control.metrics import JsonlWriter

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# Arithmetic and counting prompts (three quarters of builtin:toy) score 1.0 whatever the reply: their
# groups are all equal. The others score the reply's digit share plus a length term, which varies.
HALF_FLAT = '''
def reward(prompts, completions, **kw):
    flat = ("What is", "Count")
    varied = [sum(c.isdigit() for c in t) / max(len(t), 1) + len(t) / 1000 for t in completions]
    return [1.0 if p.startswith(flat) else v for p, v in zip(prompts, varied)]
'''


def _spec(tmp_path: Path, model: Path, **fields) -> Path:
    (tmp_path / "half_flat.py").write_text(HALF_FLAT)
    return write_spec(tmp_path, model, reward={"function": "half_flat.py:reward"},
                      rollout={"promptsPerStep": 4, "dynamicSampling": {"enabled": True, "maxRounds": 8}},
                      schedule={"steps": 3}, **fields)


def test_dynamic_sampling_trains_full_batches_of_groups_with_reward_variance_only(
    ray_session, tiny_model_dir: Path, tmp_path: Path
):
    from kuberlhf_workers.control.driver import Driver

    # A small learning rate keeps the sampled replies diverse, so the other groups keep varying.
    spec = _spec(tmp_path, tiny_model_dir, actor={"learningRate": 1e-5})
    outcome = Driver(load(spec), tmp_path, tmp_path / "out", callbacks=[
        JsonlWriter(tmp_path / "out" / "metrics.jsonl")
    ]).run()

    assert outcome.status == "completed" and outcome.step == 3
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    for line in lines:  # the trainer's own count of what it trained on
        assert line["groups_trained"] == 4 and line["groups_zero_variance"] == 0, line
        assert line["dynamic_groups_filled"] == 0 and line["dynamic_rounds"] >= 1
    assert sum(line["dynamic_groups_dropped"] for line in lines) > 0, "most prompts score flat"
    assert any(line["dynamic_rounds"] > 1 for line in lines), "some step needed a second round"
    # Every drawn prompt is consumed, kept or not: the checkpoint resumes after the last round's.
    rounds = sum(int(line["dynamic_rounds"]) for line in lines)
    assert ckpt.read_state(Path(outcome.last_checkpoint)).sampler == {"epoch": 0, "position": 4 * rounds}
    for line in lines:
        print(f"step {line['step']}: rounds {line['dynamic_rounds']:.0f}, dropped "
              f"{line['dynamic_groups_dropped']:.0f}, extra generation {line['time_dynamic_extra_s']:.2f}s "
              f"of rollout {line['time_rollout_s']:.2f}s")


def test_dynamic_sampling_stopped_and_resumed_draws_and_trains_exactly_like_an_unbroken_run(
    ray_session, tiny_model_dir: Path, tmp_path: Path
):
    from kuberlhf_workers.control.driver import Driver

    spec = _spec(tmp_path, tiny_model_dir)
    unbroken = Driver(load(spec), tmp_path, tmp_path / "unbroken").run()

    def stop_at_one(step: int, total: int, metrics: dict, last: str | None) -> None:
        stopping.request_stop()

    stopping = Driver(load(spec), tmp_path, tmp_path / "run", callbacks=[stop_at_one])
    assert stopping.run().step == 1
    resumed = Driver(load(spec), tmp_path, tmp_path / "run").run()

    assert [h["step"] for h in resumed.history] == [2, 3]
    keys = ("dynamic_rounds", "dynamic_groups_dropped", "reward_mean")
    for before, after in zip(unbroken.history[1:], resumed.history, strict=True):
        assert {k: after[k] for k in keys} == pytest.approx({k: before[k] for k in keys}, abs=1e-6)
    a, b = ckpt.read_state(Path(unbroken.last_checkpoint)), ckpt.read_state(Path(resumed.last_checkpoint))
    assert a.sampler == b.sampler
