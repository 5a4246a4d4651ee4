"""The real kubectl against the API emulator: what a user types, and what they read back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.emulator import EmulatorHandle
from tests.tools import kubectl_path, require_kubectl

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "tiny-grpo.yaml"

pytestmark = pytest.mark.skipif(kubectl_path() is None, reason="the real kubectl is not on PATH")


def kubectl(handle: EmulatorHandle, *args: str, stdin: str | None = None, ok: bool = True) -> str:
    env = {**os.environ, "KUBECONFIG": str(handle.kubeconfig)}
    done = subprocess.run([require_kubectl(), *args], input=stdin, env=env, capture_output=True, text=True,
                          timeout=30)
    if ok:
        assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def crd_text() -> str:
    """`kuberlhf crd`, the way a user installs the CRD."""
    cli = Path(sys.executable).parent / "kuberlhf"
    return subprocess.run([str(cli), "crd"], capture_output=True, text=True, check=True, cwd=ROOT).stdout


def rows(table: str) -> list[list[str]]:
    return [line.split() for line in table.strip().splitlines()]


def test_kubectl_applies_reads_patches_replaces_and_deletes_rlhfjobs(emulator: EmulatorHandle,
                                                                     tmp_path: Path) -> None:
    crd_yaml = crd_text()
    assert "created" in kubectl(emulator, "apply", "-f", "-", stdin=crd_yaml)
    assert "created" in kubectl(emulator, "apply", "-f", str(EXAMPLE))
    assert "unchanged" in kubectl(emulator, "apply", "-f", str(EXAMPLE))

    steps = str(yaml.safe_load(EXAMPLE.read_text())["spec"]["schedule"]["steps"])
    table = rows(kubectl(emulator, "get", "rlhfjobs"))
    assert table[0] == ["NAME", "PHASE", "ALGORITHM", "STEP", "TOTAL", "REWARD", "LOSS", "AGE"]
    assert table[1][:2] == ["tiny-grpo", "grpo"], "the driver fills the progress columns"

    progress = {"step": 4, "totalSteps": int(steps), "rewardMean": 0.25, "kl": 0.5, "turnsMean": 2.5}
    status = json.dumps({"status": {"phase": "Running", "progress": progress}})
    kubectl(emulator, "patch", "rlhfjob", "tiny-grpo", "--subresource=status", "--type=merge", "-p", status)
    table = rows(kubectl(emulator, "get", "rlhfjobs", "-o", "wide"))
    assert table[0][-5:] == ["ACCURACY", "KL", "SAMPLES/S", "TURNS", "AGE"]
    assert table[1][:7] == ["tiny-grpo", "Running", "grpo", "4", steps, "0.25", "0.5"]
    assert table[1][-2] == "2.5", "the wide table shows the episodes' mean turns"
    assert "Running" in kubectl(emulator, "get", "rlhfjob", "tiny-grpo", "-o", "jsonpath={.status.phase}")
    kubectl(emulator, "wait", "rlhfjob/tiny-grpo", "--for=jsonpath={.status.phase}=Running", "--timeout=5s")

    obj = yaml.safe_load(kubectl(emulator, "get", "rlhfjob", "tiny-grpo", "-o", "yaml"))
    obj["spec"]["schedule"]["steps"] += 10
    (tmp_path / "replaced.yaml").write_text(yaml.safe_dump(obj))
    kubectl(emulator, "replace", "-f", str(tmp_path / "replaced.yaml"))
    replaced = yaml.safe_load(kubectl(emulator, "get", "rlhfjob", "tiny-grpo", "-o", "yaml"))
    assert replaced["metadata"]["generation"] == 2 and replaced["status"]["progress"]["step"] == 4
    stale = kubectl(emulator, "replace", "-f", str(tmp_path / "replaced.yaml"), ok=False)
    assert "the object has been modified" in stale

    assert 'deleted' in kubectl(emulator, "delete", "rlhfjob", "tiny-grpo")
    assert "No resources found" in kubectl(emulator, "get", "rlhfjobs")


def test_kubectl_get_watch_streams_changes(emulator: EmulatorHandle) -> None:
    crd_yaml = crd_text()
    kubectl(emulator, "apply", "-f", "-", stdin=crd_yaml)
    kubectl(emulator, "apply", "-f", str(EXAMPLE))
    env = {**os.environ, "KUBECONFIG": str(emulator.kubeconfig)}
    watcher = subprocess.Popen([require_kubectl(), "get", "rlhfjobs", "-w", "--request-timeout=5s"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        kubectl(emulator, "patch", "rlhfjob", "tiny-grpo", "--subresource=status", "--type=merge",
                "-p", '{"status": {"phase": "Succeeded", "progress": {"step": 20}}}')
        time.sleep(1.0)
    finally:
        watcher.terminate()
        output, _ = watcher.communicate(timeout=10)
    lines = rows(output)
    assert lines[0][0] == "NAME"
    assert any(line[:2] == ["tiny-grpo", "Succeeded"] and line[3] == "20" for line in lines[1:]), output


def test_kubectl_describe_shows_the_operator_events(emulator: EmulatorHandle) -> None:
    kubectl(emulator, "apply", "-f", "-", stdin=crd_text())
    kubectl(emulator, "apply", "-f", str(EXAMPLE))
    job = yaml.safe_load(kubectl(emulator, "get", "rlhfjob", "tiny-grpo", "-o", "yaml"))
    event = {"apiVersion": "v1", "kind": "Event", "metadata": {"generateName": "tiny-grpo."},
             "involvedObject": {"apiVersion": "kuberlhf.io/v1alpha1", "kind": "RLHFJob", "name": "tiny-grpo",
                                "namespace": "default", "uid": job["metadata"]["uid"]},
             "type": "Warning", "reason": "InvalidSpec",
             "message": "spec.rollout.samplesPerPrompt: too small",
             "source": {"component": "kuberlhf-operator"}, "count": 1}
    emulator.create(event, "default")
    described = kubectl(emulator, "describe", "rlhfjob", "tiny-grpo")
    assert "InvalidSpec" in described and "samplesPerPrompt: too small" in described
