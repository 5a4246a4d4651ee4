"""`kuberlhf run` end to end, as a user runs it: a real subprocess with its own private Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from run_specs import write_spec

from kuberlhf_workers.control.metrics import REQUIRED_KEYS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _run(args: list[str], cwd: Path, cache: Path, **kw) -> subprocess.Popen:
    env = dict(os.environ, KUBERLHF_CACHE=str(cache), OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "kuberlhf"), "run", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=400)
    return proc.returncode, out


def _start_then_ctrl_c(spec: Path, cwd: Path, cache: Path, metrics: Path) -> tuple[int, str]:
    """Start a run, wait for its first metrics row, then do what a terminal does on Ctrl-C: SIGINT
    to the whole process group."""
    proc = _run([str(spec), "--quiet"], cwd, cache, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().strip()) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    return _finish(proc)


def test_run_reports_each_step_stops_on_ctrl_c_resumes_into_the_same_mlflow_run_and_knows_when_it_is_done(
    tiny_model_dir: Path, model_cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """One run carries every path a user's Ctrl-C and rerun touch (one run: each costs minutes on
    two cores): the checkpoint on SIGINT, the resume, the MLflow run continued, a prompt mix's
    sampler state through a real checkpoint, and the already-complete rerun."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # this test reads the file store too
    (tmp_path / "extra.jsonl").write_text("".join(json.dumps({"prompt": f"Write {n} digits:"}) + "\n"
                                                  for n in range(2, 9)))
    mix = [{"path": "builtin:toy", "weight": 0.75}, {"path": "extra.jsonl", "weight": 0.25}]
    spec = write_spec(tmp_path, tiny_model_dir, schedule={"steps": 50}, checkpoint={"everySteps": 100},
                      data={"prompts": "builtin:toy", "promptMix": mix, "maxSamples": 40, "maxNewTokens": 16},
                      tracking={"mlflow": {"uri": "file:mlruns", "experiment": "tiny"}})
    run_dir = tmp_path / "runs" / "run-test"  # the default output folder: runs/<job name>
    metrics = run_dir / "metrics.jsonl"
    code, out = _start_then_ctrl_c(spec, tmp_path, model_cache_dir, metrics)
    assert code == 130, out
    stopped_at = len(metrics.read_text().splitlines())
    assert 1 <= stopped_at < 50
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{stopped_at:06d}", out
    run_id = json.loads((run_dir / "mlflow-run.json").read_text())["runId"]
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    assert client.get_run(run_id).info.status == "KILLED"
    saved = json.loads((run_dir / "checkpoints" / f"step-{stopped_at:06d}" / "state.json").read_text())
    assert saved["sampler"]["draws"] == 8 * stopped_at and {"epoch.1", "position.1"} <= set(saved["sampler"])

    total = str(stopped_at + 1)
    code, out = _finish(_run([str(spec), "--quiet", "--max-steps", total], tmp_path, model_cache_dir))
    assert code == 0, out
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [x["step"] for x in rows] == list(range(1, stopped_at + 2)), "resumed after the last step"
    assert all(x.get(k) is not None for x in rows for k in REQUIRED_KEYS)
    assert f"step {total}/{total}" in out and "reward" in out
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert "report in" in out and 'src="data:image/png;base64,' in (run_dir / "report.html").read_text()
    assert "algorithm: grpo" in (run_dir / "spec.yaml").read_text()
    [experiment] = [e for e in client.search_experiments() if e.name == "tiny"]
    [run_info] = client.search_runs([experiment.experiment_id])
    assert run_info.info.run_id == run_id and run_info.info.status == "FINISHED", "one run, continued"
    in_jsonl = {k for r in rows for k, v in r.items() if v is not None} - {"step", "time"}
    assert set(run_info.data.metrics) == in_jsonl and set(REQUIRED_KEYS) - {"step"} <= in_jsonl
    for key in in_jsonl:
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        expected = [(r["step"], pytest.approx(float(r[key]))) for r in rows if r.get(key) is not None]
        assert logged == expected, key
    assert run_info.data.params["algorithm"] == "grpo"

    code, out = _finish(_run([str(spec), "--quiet", "--max-steps", total], tmp_path, model_cache_dir))
    assert code == 0, out
    assert f"already complete at step {total}/{total}" in out
    assert len(metrics.read_text().splitlines()) == stopped_at + 1, "nothing was trained again"


def test_a_bad_spec_fails_fast_naming_the_field(tmp_path: Path, model_cache_dir: Path):
    spec = write_spec(tmp_path, tmp_path, rollout={"samplesPerPrompt": 1})
    code, out = _finish(_run([str(spec)], tmp_path, model_cache_dir))
    assert code == 1
    assert "spec.rollout.samplesPerPrompt" in out
