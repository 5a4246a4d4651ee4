"""A checkpoint knows the job that wrote it: a run resumes only its own job's checkpoints, and the
default checkpoint folder lives inside the run's output folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml
from run_specs import job_dict, write_spec

from kuberlhf.api import parse_job
from kuberlhf_workers.control import checkpoint as ckpt


def job(**spec: object):
    return parse_job(job_dict(Path("model"), **spec))


@pytest.mark.unit
def test_the_fingerprint_follows_what_is_trained_not_how_long_or_where() -> None:
    base = ckpt.training_fingerprint(job().spec)
    assert ckpt.training_fingerprint(job(schedule={"steps": 999}).spec) == base
    assert ckpt.training_fingerprint(job(actor={"replicas": 2, "resources": {"cpu": "4"}}).spec) == base
    assert ckpt.training_fingerprint(job(checkpoint={"everySteps": 3}).spec) == base
    # On CPUs `auto` is what it becomes here (fp32: this model's config is not readable), so a
    # checkpoint of `kuberlhf run` (which writes the resolved value) resumes a job saying auto.
    assert ckpt.training_fingerprint(job(precision="fp32").spec) == base
    assert ckpt.training_fingerprint(job(precision="auto", actor={"resources": {"gpus": 1}}).spec) != (
        ckpt.training_fingerprint(job(precision="fp32", actor={"resources": {"gpus": 1}}).spec)
    ), "with GPUs auto is decided per node, so it stays a value of its own"
    for changed in (
        {"actor": {"learningRate": 1e-4}},
        {"seed": 7},
        {"data": {"prompts": "p.jsonl"}},
        {"data": {"promptMix": [{"path": "p.jsonl", "weight": 1.0}]}},
        {"data": {"maxSamples": 64}},
        {"kl": {"coef": 0.1}},
        {"algorithm": "rloo"},
        {"rollout": {"temperature": 0.5}},
        {"rollout": {"dynamicSampling": {"enabled": True}}},
        {"actor": {"lora": {"rank": 8}}},
        {"precision": "bf16"},
    ):
        assert ckpt.training_fingerprint(job(**changed).spec) != base, changed


@pytest.mark.unit
def test_resuming_another_jobs_or_a_changed_specs_checkpoint_is_refused_naming_both(tmp_path: Path) -> None:
    mine = ckpt.job_identity(job(name="mine"))
    state = ckpt.TrainingState(3, 10, {"epoch": 0, "position": 3}, 42, job=mine)
    ckpt.write_state(tmp_path, state)
    assert ckpt.read_state(tmp_path) == state
    assert ckpt.resume_problem(tmp_path, state, mine) is None
    other = ckpt.job_identity(job(name="theirs"))
    problem = ckpt.resume_problem(tmp_path, state, other)
    assert problem is not None and "'mine'" in problem and "'theirs'" in problem and "--no-resume" in problem
    changed = ckpt.job_identity(job(name="mine", seed=1))
    assert "different spec" in (ckpt.resume_problem(tmp_path, state, changed) or "")
    legacy = ckpt.TrainingState(3, 10, {"epoch": 0, "position": 3}, 42)
    assert "does not say which job" in (ckpt.resume_problem(tmp_path, legacy, mine) or "")


@pytest.mark.unit
def test_the_default_checkpoint_folder_is_inside_the_output_folder(tmp_path: Path) -> None:
    assert ckpt.resolve_root(None, tmp_path) == tmp_path / "checkpoints"
    assert job(checkpoint={"path": None}).spec.checkpoint.path is None


def _spec_without_checkpoint_path(folder: Path, model: Path, name: str, **spec: object) -> Path:
    path = write_spec(folder, model, name=name, schedule={"steps": 1}, **spec)
    doc = yaml.safe_load(path.read_text())
    del doc["spec"]["checkpoint"]["path"]
    path.write_text(yaml.safe_dump(doc))
    return path


def _run(spec: Path, output: Path | None = None) -> int:
    from kuberlhf_workers.control import run

    args = argparse.Namespace(
        file=str(spec),
        max_steps=None,
        output=str(output) if output else None,
        ray_address="local",
        no_resume=False,
        quiet=True,
    )
    return int(run.main(args))


@pytest.mark.slow
def test_two_jobs_with_default_checkpoints_each_train_and_neither_resumes_the_other(
    ray_session,
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)  # the default output folder is runs/<job name> here
    a = _spec_without_checkpoint_path(tmp_path / "a", tiny_model_dir, "job-a")
    b = _spec_without_checkpoint_path(tmp_path / "b", tiny_model_dir, "job-b", actor={"learningRate": 1e-3})
    assert _run(a) == 0 and _run(b) == 0
    for name in ("job-a", "job-b"):
        rows = [
            json.loads(line) for line in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
        ]
        assert [r["step"] for r in rows] == [1], f"{name} trained its step"
        assert ckpt.read_state(ckpt.latest(tmp_path / "runs" / name / "checkpoints")).job.name == name
    capsys.readouterr()

    # job-b pointed at job-a's checkpoints: refused before any training, naming both jobs.
    doc = yaml.safe_load(b.read_text())
    doc["spec"]["checkpoint"]["path"] = str(tmp_path / "runs" / "job-a" / "checkpoints")
    b.write_text(yaml.safe_dump(doc))
    assert _run(b) == 1
    err = capsys.readouterr().err
    assert "belongs to job 'job-a', not to this job 'job-b'" in err, err
