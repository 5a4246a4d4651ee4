"""Secrets hygiene: a secret's value, referenced by an RLHFJob, never leaks into what others can
read — the job's status, Events, the children the operator makes, the operator's logs — nor into
the reward server's logs when it serves with a bearer token.

The value is recognisable ("s3cr3t-VALUE-123"), so it is searched for verbatim and base64-encoded
(the form a Secret's data takes, and so the form a careless copy would take).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from kuberlhf_operator.kubeapi import KubeApi
from kuberlhf_workers.rewards.model import train_tiny_reward_model
from tests.emulator import EmulatorHandle
from tests.emulator.kuberay_standin import sleep_runner
from tests.operator.conftest import running_operator, running_standin, wait_for
from tests.operator.test_handlers import JOBS, job_status, tiny_job

HUB_TOKEN = "s3cr3t-VALUE-123"
REWARD_TOKEN = "s3cr3t-VALUE-456"
MLFLOW_TOKEN = "s3cr3t-VALUE-789"
SECRETS = (HUB_TOKEN, REWARD_TOKEN, MLFLOW_TOKEN)


def leaks(text: str) -> list[str]:
    forms = [form for value in SECRETS for form in (value, base64.b64encode(value.encode()).decode())]
    return [form for form in forms if form in text]


def secret(name: str, key: str, value: str) -> dict[str, object]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": "default"},
            "type": "Opaque", "data": {key: base64.b64encode(value.encode()).decode()}}


def test_secret_values_stay_out_of_status_events_children_and_operator_logs(
        cluster: EmulatorHandle, admin: KubeApi, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    cluster.create(secret("hub", "token", HUB_TOKEN), "default")
    cluster.create(secret("reward", "bearer", REWARD_TOKEN), "default")
    cluster.create(secret("mlflow", "token", MLFLOW_TOKEN), "default")
    job = tiny_job()
    job["spec"]["tracking"] = {"mlflow": {"uri": "https://mlflow.example",
                                          "tokenSecretRef": {"name": "mlflow", "key": "token"}}}
    job["spec"]["model"]["hubTokenSecretRef"] = {"name": "hub", "key": "token"}
    job["spec"]["reward"] = {"model": "builtin:tiny", "tokenSecretRef": {"name": "reward", "key": "bearer"}}
    with running_operator(cluster), running_standin(cluster, runner=sleep_runner(0.3)):
        admin.create(job)
        wait_for(lambda: job_status(cluster).get("phase") == "Succeeded", what="phase Succeeded")
        admin.merge_patch(f"{JOBS}/tiny", {"spec": {"seed": 5}})  # a refusal: a Warning Event with a message
        wait_for(lambda: any(c.get("reason") == "ImmutableFieldChanged"
                             for c in job_status(cluster).get("conditions", [])), what="refusal")

    rayjob = cluster.get("ray.io", "rayjobs", "default", "tiny-ray")
    assert rayjob is not None
    env = json.dumps(rayjob["spec"]["rayClusterSpec"])
    assert '"secretKeyRef": {"name": "hub", "key": "token"}' in env, "the hub token is passed by reference"
    assert '"secretKeyRef": {"name": "mlflow", "key": "token"}' in env, "so is the tracking server's"
    # A reward model scores in-process: the reward server's token goes nowhere.
    assert '"name": "reward"' not in env

    stored = cluster.call(lambda: [(key, obj) for key, bucket in cluster.emulator.store.items()
                                   for obj in bucket.values()])
    readable = [obj for (group, plural), obj in stored if (group, plural) != ("", "secrets")]
    kinds = {obj["kind"] for obj in readable}
    assert {"RLHFJob", "Event", "RayJob", "RayCluster", "ConfigMap", "Role"} <= kinds
    for obj in readable:
        assert leaks(json.dumps(obj)) == [], f"{obj['kind']} {obj['metadata']['name']} carries a secret"
    logged = "\n".join(f"{r.name} {r.getMessage()}" for r in caplog.records)
    assert "kuberlhf.operator" in logged, "the operator's log was not captured"
    assert leaks(logged) == []


@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(train_tiny_reward_model(tmp_path_factory.mktemp("rm"), tiny_model_dir, seed=0))


def call(url: str, body: bytes | None, headers: dict[str, str], method: str = "POST") -> int:
    request = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except urllib.error.URLError:
        return 0  # not listening yet


def test_the_reward_server_never_logs_its_token(reward_model_dir: Path, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-c", "from kuberlhf.cli import main; main()", "reward-server",
               "--model", str(reward_model_dir), "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "KUBERLHF_REWARD_TOKEN": REWARD_TOKEN}
    stderr_path = tmp_path / "stderr"
    with stderr_path.open("w") as stderr:
        proc = subprocess.Popen(command, env=env, stdout=stderr, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    good = {"prompts": ["Q: "], "completions": ["1 2"]}
    try:
        deadline = time.monotonic() + 60
        while call(f"{url}/readyz", None, {}, "GET") != 200:
            assert time.monotonic() < deadline and proc.poll() is None, stderr_path.read_text()
            time.sleep(0.2)
        body = json.dumps(good).encode()
        secret_body = json.dumps({"prompts": [REWARD_TOKEN], "completions": [HUB_TOKEN]}).encode()
        tries = [  # (body, Authorization header or None)
            (body, f"Bearer {REWARD_TOKEN}"), (body, None), (body, f"Bearer {REWARD_TOKEN}x"),
            (body, REWARD_TOKEN), (secret_body, f"Bearer {REWARD_TOKEN}"),
            (REWARD_TOKEN.encode(), f"Bearer {REWARD_TOKEN}"),
        ]
        answers = [call(f"{url}/score", data, {"Content-Type": "application/json"}
                        | ({"Authorization": auth} if auth else {})) for data, auth in tries]
        assert answers == [200, 401, 401, 401, 200, 400]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    output = stderr_path.read_text()
    assert "auth on" in output and "ready" in output, output
    assert leaks(output) == [], output
