"""MLflow tracking against a real local MLflow file store (mlflow-skinny has no SQL store): the run
holds what metrics.jsonl holds, the spec's params, the right end status, and a resumed job logs
into the same run."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
from run_specs import job_dict, write_spec

from kuberlhf.api import RLHFJob, parse_job
from kuberlhf_workers.control import run, tracking
from kuberlhf_workers.control.metrics import JsonlWriter

pytestmark = pytest.mark.unit


def _job(tmp_path: Path, uri: str = "file:mlruns", **mlflow: Any) -> RLHFJob:
    return parse_job(job_dict(tmp_path / "model", tracking={"mlflow": {"uri": uri, **mlflow}}))


def _client(out: Path) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking.store_uri("file:mlruns", out))


def _rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _histories(client: Any, run_id: str) -> dict[str, list[tuple[int, float]]]:
    keys = client.get_run(run_id).data.metrics
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


def _as_in_jsonl(rows: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key not in ("step", "time") and value is not None:
                out.setdefault(key, []).append((row["step"], float(value)))
    return out


def _train(callbacks: list[Any], steps: range) -> None:
    for step in steps:
        metrics = {"reward_mean": 0.25 * step, "kl": 1e-3 * step, "time_train_s": 1.5,
                   "rollout_tokens": 64 * step, "eval_pass_at_k": math.nan}
        for callback in callbacks:
            callback(step, steps.stop - 1, metrics, None)


def test_the_mlflow_run_holds_the_rows_of_metrics_jsonl_the_spec_params_and_ends_finished(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    job = _job(tmp_path, runName="first try")
    tracker = tracking.start_tracking(job, out, resume=True)
    assert tracker is not None
    _train([JsonlWriter(out / "metrics.jsonl"), tracker], range(1, 5))
    tracker.end(tracking.run_status("completed"))

    client = _client(out)
    assert (out / "mlruns").is_dir(), "a relative file: store lives in the output folder"
    run_info = client.get_run(tracker.run_id)
    assert run_info.info.status == "FINISHED" and run_info.info.run_name == "first try"
    assert _histories(client, tracker.run_id) == _as_in_jsonl(_rows(out))
    assert "eval_pass_at_k" not in run_info.data.metrics, "a NaN (null in metrics.jsonl) is not logged"
    params = run_info.data.params
    assert params["algorithm"] == "grpo" and params["seed"] == "42"
    assert params["actor.learningRate"] == "0.003" and params["rollout.samplesPerPrompt"] == "4"
    assert params["data.prompts"] == "builtin:toy" and params["model.actor"] == str(tmp_path / "model")
    assert "schedule.steps" not in params, "what may change on resume is not a param"
    assert run_info.data.tags["kuberlhf.job"] == "run-test"
    experiment = client.get_experiment(run_info.info.experiment_id)
    assert experiment.name == "kuberlhf"


@pytest.mark.parametrize(("outcome", "status"), [("interrupted", "KILLED"), ("already-complete", "FINISHED")])
def test_the_run_ends_with_the_status_of_the_outcome(tmp_path: Path, outcome: str, status: str) -> None:
    tracker = tracking.start_tracking(_job(tmp_path), tmp_path, resume=True)
    assert tracker is not None
    tracker.end(tracking.run_status(outcome))
    assert _client(tmp_path).get_run(tracker.run_id).info.status == status


def test_a_resumed_job_logs_into_the_same_mlflow_run_and_no_resume_opens_a_new_one(tmp_path: Path) -> None:
    job = _job(tmp_path, experiment="mixes")
    first = tracking.start_tracking(job, tmp_path, resume=True)
    assert first is not None
    _train([JsonlWriter(tmp_path / "metrics.jsonl"), first], range(1, 3))
    first.end("KILLED")

    resumed = tracking.start_tracking(job, tmp_path, resume=True)
    assert resumed is not None and resumed.run_id == first.run_id
    client = _client(tmp_path)
    assert client.get_run(resumed.run_id).info.status == "RUNNING"
    _train([JsonlWriter(tmp_path / "metrics.jsonl"), resumed], range(3, 5))
    resumed.end("FINISHED")
    assert client.get_run(first.run_id).info.status == "FINISHED"
    assert _histories(client, first.run_id) == _as_in_jsonl(_rows(tmp_path))
    assert [s for s, _ in _histories(client, first.run_id)["reward_mean"]] == [1, 2, 3, 4]

    fresh = tracking.start_tracking(job, tmp_path, resume=False)
    changed = tracking.start_tracking(_job(tmp_path, experiment="mixes").model_copy(
        update={"spec": job.spec.model_copy(update={"seed": 7})}), tmp_path, resume=True)
    assert fresh is not None and changed is not None
    assert len({first.run_id, fresh.run_id, changed.run_id}) == 3, "a new run, not the finished one reopened"
    assert json.loads((tmp_path / tracking.RUN_FILE).read_text())["runId"] == changed.run_id


def test_a_step_the_store_refuses_is_reported_and_training_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tracker = tracking.start_tracking(_job(tmp_path), tmp_path, resume=True)
    assert tracker is not None
    _client(tmp_path).delete_run(tracker.run_id)  # the store now refuses to log to it
    _train([tracker], range(1, 3))
    assert tracker.failures == 2
    assert f"step 2 not logged to MLflow run {tracker.run_id}" in capsys.readouterr().err


def test_without_mlflow_installed_the_run_fails_at_start_naming_the_field_and_the_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in [m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` meets when it is not installed
    spec = write_spec(tmp_path, tmp_path / "model", tracking={"mlflow": {"uri": "file:mlruns"}})
    args = argparse.Namespace(file=str(spec), max_steps=None, output=str(tmp_path / "out"),
                              ray_address="local", no_resume=False, quiet=True)
    assert run.main(args) == 1
    err = capsys.readouterr().err
    assert "spec.tracking.mlflow: the MLflow client is not installed: pip install 'kuberlhf[mlflow]'" in err
    assert not (tmp_path / "out" / "metrics.jsonl").exists(), "nothing trained"


def test_an_unreachable_tracking_server_fails_at_start_naming_the_uri(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with pytest.raises(ValueError, match=rf"spec\.tracking\.mlflow\.uri: cannot open an MLflow run at "
                                         rf"http://127\.0\.0\.1:{port}"):
        tracking.start_tracking(_job(tmp_path, uri=f"http://127.0.0.1:{port}"), tmp_path, resume=True)


def test_a_relative_file_store_is_put_in_the_output_folder_and_other_uris_are_kept(tmp_path: Path) -> None:
    assert tracking.store_uri("file:mlruns", tmp_path) == (tmp_path / "mlruns").as_uri()
    assert tracking.store_uri("../shared-mlruns", tmp_path) == (tmp_path.parent / "shared-mlruns").as_uri()
    assert tracking.store_uri("file:///srv/mlruns", tmp_path) == "file:///srv/mlruns"
    assert tracking.store_uri("https://mlflow.example/", tmp_path) == "https://mlflow.example/"


def test_a_job_without_tracking_opens_nothing(tmp_path: Path) -> None:
    assert tracking.start_tracking(parse_job(job_dict(tmp_path)), tmp_path, resume=True) is None
    assert not (tmp_path / tracking.RUN_FILE).exists()
