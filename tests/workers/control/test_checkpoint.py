"""Checkpoints: the atomic `latest` pointer, retention, and exact resume of a real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from run_specs import load, write_spec

from kuberlhf_workers.control import checkpoint as ckpt

pytestmark = pytest.mark.timeout(900)


def _fake_checkpoint(root: Path, step: int) -> Path:
    directory = ckpt.step_dir(root, step)
    ckpt.write_state(directory, ckpt.TrainingState(step, 10, {"epoch": 0, "position": step}, 7))
    return directory


def test_latest_names_the_newest_published_checkpoint_and_old_ones_are_pruned(tmp_path: Path):
    assert ckpt.latest(tmp_path) is None
    for step in (2, 4, 6):
        ckpt.publish(tmp_path, _fake_checkpoint(tmp_path, step), keep=2)
    assert ckpt.latest(tmp_path) == ckpt.step_dir(tmp_path, 6)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000004", "step-000006"]
    assert ckpt.read_state(ckpt.latest(tmp_path)).sampler == {"epoch": 0, "position": 6}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".latest")], "no temp file left behind"


def test_an_unpublished_checkpoint_is_ignored_and_a_dangling_pointer_is_an_error(tmp_path: Path):
    ckpt.publish(tmp_path, _fake_checkpoint(tmp_path, 2), keep=5)
    _fake_checkpoint(tmp_path, 4)  # written but never published: a crash mid-save
    assert ckpt.latest(tmp_path) == ckpt.step_dir(tmp_path, 2)
    (tmp_path / ckpt.LATEST).write_text("step-000009\n")
    with pytest.raises(FileNotFoundError, match="step-000009"):
        ckpt.latest(tmp_path)


def test_relative_checkpoint_paths_live_in_the_output_folder(tmp_path: Path):
    assert ckpt.resolve_root("checkpoints", tmp_path) == tmp_path / "checkpoints"
    assert ckpt.resolve_root("/abs/ckpt", tmp_path) == Path("/abs/ckpt")



def _weights(checkpoint: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(checkpoint) / "model" / "model.safetensors"))


@pytest.mark.slow
def test_a_stopped_and_resumed_run_ends_exactly_like_an_unbroken_one(
    ray_session, tiny_model_dir: Path, tmp_path: Path
):
    from kuberlhf_workers.control.driver import Driver

    spec_path = write_spec(
        tmp_path,
        tiny_model_dir,
        actor={"learningRate": 1e-2},
        schedule={"steps": 4},
        checkpoint={"everySteps": 2, "keep": 2},
    )
    job = load(spec_path)
    unbroken = Driver(job, tmp_path, tmp_path / "unbroken").run()

    def stop_at_two(step: int, total: int, metrics: dict, last: str | None) -> None:
        if step == 2:
            stopping.request_stop()

    stopping = Driver(job, tmp_path, tmp_path / "broken", callbacks=[stop_at_two])
    stopped = stopping.run()
    resumed = Driver(job, tmp_path, tmp_path / "broken").run()

    assert (stopped.status, stopped.step) == ("interrupted", 2)
    assert (resumed.status, resumed.step) == ("completed", 4)
    assert [h["step"] for h in resumed.history] == [3, 4], "resume continues at step 3, nothing repeated"
    a, b = ckpt.read_state(Path(unbroken.last_checkpoint)), ckpt.read_state(Path(resumed.last_checkpoint))
    assert (a.step, a.sampler) == (b.step, b.sampler) == (4, b.sampler) and b.sampler["position"] > 0
    for h_unbroken, h_resumed in zip(unbroken.history[2:], resumed.history, strict=True):
        assert h_resumed["reward_mean"] == pytest.approx(h_unbroken["reward_mean"], abs=1e-6)
    final_a, final_b = _weights(unbroken.last_checkpoint), _weights(resumed.last_checkpoint)
    # Bit-exact in every standalone run so far; the message carries what a rare divergence needs
    # to be told apart (the worst tensor, and whether the rollouts' log-probs drifted).
    keys = ("reward_mean", "policy_loss", "approx_kl", "clip_fraction")
    steps = [[{k: h.get(k) for k in keys} for h in run] for run in (unbroken.history[2:], resumed.history)]
    worst = max((float((final_b[name] - tensor).abs().max()), name) for name, tensor in final_a.items())
    assert worst[0] <= 1e-5, f"weights differ after resume: max |diff| {worst}; steps 3-4 {steps}"


def test_metrics_rows_of_redone_steps_are_replaced_not_repeated(tmp_path: Path) -> None:
    from kuberlhf_workers.control.metrics import JsonlWriter

    path = tmp_path / "metrics.jsonl"
    first = JsonlWriter(path)
    for step in (1, 2, 3, 4):
        first(step, 4, {"reward_mean": float(step)}, None)
    resumed = JsonlWriter(path)  # the crash came after step 4; the checkpoint was at step 2
    for step in (3, 4):
        resumed(step, 4, {"reward_mean": 10.0 * step}, None)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["reward_mean"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
