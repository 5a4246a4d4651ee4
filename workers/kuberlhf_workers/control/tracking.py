"""MLflow tracking (`spec.tracking.mlflow`): every metrics row of metrics.jsonl also goes to one
MLflow run, with the settings that shape training as its params, ending FINISHED, FAILED or KILLED.

One job is one MLflow run: its id is kept in the output folder (`mlflow-run.json`, on the
checkpoint volume in a cluster), so a resumed run or a RayJob retry logs into the same run instead
of opening a new one. The client is imported only when the spec asks for it, so the training
program runs without mlflow installed. The tracking server's token reaches the client through
MLFLOW_TRACKING_TOKEN, which the operator sets on the head container only; nothing here prints it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse

from kuberlhf.api import RLHFJob, RLHFJobSpec, spec_to_dict
from kuberlhf_workers.control.checkpoint import SHAPING_FIELDS, training_fingerprint

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

FIELD = "spec.tracking.mlflow"
RUN_FILE = "mlflow-run.json"
RunStatus = Literal["FINISHED", "FAILED", "KILLED"]
# How each of the program's outcomes ends the MLflow run; an exception ends it FAILED.
STATUS_OF: dict[str, RunStatus] = {
    "completed": "FINISHED", "already-complete": "FINISHED", "interrupted": "KILLED"
}
MAX_PARAM_LENGTH = 6000  # MLflow refuses longer param values
PARAMS_PER_CALL = 100  # and more params in one log_batch


def run_status(outcome: str) -> RunStatus:
    return STATUS_OF[outcome]


def params_of(spec: RLHFJobSpec) -> dict[str, str]:
    """The settings that shape what is trained (checkpoint.SHAPING_FIELDS), flattened to dotted
    camelCase keys. MLflow params cannot change once logged, and a resumed run must agree on exactly
    these fields, so a resumed run never tries to change one; schedule length and resources may
    change on resume and are left out."""
    full = spec_to_dict(spec)
    out: dict[str, str] = {}

    def put(key: str, value: Any) -> None:
        if isinstance(value, dict):
            for sub, item in value.items():
                put(f"{key}.{sub}", item)
        elif value is not None:
            text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
            out[key] = text[:MAX_PARAM_LENGTH]

    for key, subkeys in SHAPING_FIELDS.items():
        value = full.get(key)
        if subkeys and isinstance(value, dict):
            value = {k: value[k] for k in subkeys if k in value}
        put(key, value)
    return out


def metrics_of(metrics: dict[str, Any]) -> dict[str, float]:
    """The row's numbers MLflow can hold: metrics.jsonl writes a non-finite value as null, and
    MLflow gets no value at all for it."""
    return {
        k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(float(v))
    }


def store_uri(uri: str, output_dir: Path) -> str:
    """The tracking URI the client uses: a relative file store (`file:mlruns`, or a bare path) is put
    under the run's output folder, as checkpoint.path is, so nothing lands outside it unasked."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        return uri
    path = Path(parsed.path if parsed.scheme else uri).expanduser()
    return (path if path.is_absolute() else (output_dir / path).resolve()).as_uri()


def _client(uri: str) -> MlflowClient:
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ValueError(
            f"{FIELD}: the MLflow client is not installed: pip install 'kuberlhf[mlflow]' (or remove "
            f"{FIELD})"
        ) from None
    if uri.startswith("file:"):
        # mlflow 3 keeps its file store behind this switch; a file: URI in the spec is that choice.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        warnings.filterwarnings("ignore", message=".*[Ff]ile.*store.*", category=FutureWarning)
    return MlflowClient(tracking_uri=uri)


class MlflowTracker:
    """A progress callback logging each step's metrics to one MLflow run. A tracking server that
    fails mid-run costs its rows (said on stderr), never the training run."""

    def __init__(self, client: MlflowClient, run_id: str, uri: str):
        self.client, self.run_id, self.uri = client, run_id, uri
        self.failures = 0

    def __call__(self, step: int, total: int, metrics: dict[str, float], last_checkpoint: str | None) -> None:
        from mlflow.entities import Metric
        from mlflow.exceptions import MlflowException

        now = int(time.time() * 1000)
        values = [Metric(k, v, now, step) for k, v in metrics_of(metrics).items()]
        try:
            self.client.log_batch(self.run_id, metrics=values)
        except (MlflowException, OSError) as exc:
            self.failures += 1
            print(f"{FIELD}: step {step} not logged to MLflow run {self.run_id} at {self.uri}: "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)

    def end(self, status: RunStatus) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.set_terminated(self.run_id, status)
        except (MlflowException, OSError) as exc:
            print(f"{FIELD}: could not mark MLflow run {self.run_id} {status}: {exc}", file=sys.stderr)


def _saved_run(client: MlflowClient, output_dir: Path, uri: str, fingerprint: str) -> str | None:
    """The run id this output folder logged to before, when it can be continued: same store, same
    training fingerprint (what the checkpoints resume under), and the run still there."""
    from mlflow.exceptions import MlflowException

    path = output_dir / RUN_FILE
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved.get("trackingUri") != uri or saved.get("fingerprint") != fingerprint:
        return None
    try:
        run = client.get_run(saved["runId"])
    except MlflowException:
        return None
    return run.info.run_id if run.info.lifecycle_stage == "active" else None


def start_tracking(job: RLHFJob, output_dir: Path, resume: bool) -> MlflowTracker | None:
    """Open (or, resuming, reopen) the job's MLflow run; None when the spec tracks nothing. A
    ValueError naming the field when the client is missing or the store cannot be reached, before
    any actor starts."""
    spec = job.spec.tracking.mlflow
    if spec is None:
        return None
    uri = store_uri(spec.uri, output_dir)
    client = _client(uri)
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException

    fingerprint = training_fingerprint(job.spec)
    try:
        run_id = _saved_run(client, output_dir, uri, fingerprint) if resume else None
        if run_id is not None:
            client.update_run(run_id, status="RUNNING")
        else:
            found = client.get_experiment_by_name(spec.experiment)
            experiment_id = found.experiment_id if found else client.create_experiment(spec.experiment)
            tags = {"kuberlhf.job": job.metadata.name, "kuberlhf.fingerprint": fingerprint}
            run_id = client.create_run(experiment_id, run_name=spec.run_name or job.metadata.name,
                                       tags=tags).info.run_id
            record = {"runId": run_id, "trackingUri": uri, "experimentId": experiment_id,
                      "fingerprint": fingerprint}
            (output_dir / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n")
        logged = client.get_run(run_id).data.params
        params = [Param(k, v) for k, v in params_of(job.spec).items() if k not in logged]
        for i in range(0, len(params), PARAMS_PER_CALL):
            client.log_batch(run_id, params=params[i : i + PARAMS_PER_CALL])
    except (MlflowException, OSError) as exc:
        raise ValueError(
            f"{FIELD}.uri: cannot open an MLflow run at {uri}: {type(exc).__name__}: {exc}"
        ) from None
    print(f"MLflow run {run_id} in experiment {spec.experiment!r} at {uri}", file=sys.stderr, flush=True)
    return MlflowTracker(client, run_id, uri)
