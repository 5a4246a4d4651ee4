"""The driver's progress reporter against the API emulator: coalescing, least privilege, and an
API that is slow or gone never holding training up."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from kuberlhf import crd
from kuberlhf.api import Progress, parse_job
from kuberlhf_operator.kubeapi import KubeApi, object_path
from kuberlhf_operator.rbac import build_driver_rbac
from kuberlhf_workers.control.status_reporter import StatusReporter, from_environment, progress_document
from tests.emulator import EmulatorHandle, running_emulator

JOB = {"apiVersion": "kuberlhf.io/v1alpha1", "kind": "RLHFJob",
       "metadata": {"name": "tiny", "namespace": "default"},
       "spec": {"algorithm": "grpo", "model": {"actor": "builtin:tiny"}, "reward": {"function": "m:f"}}}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[EmulatorHandle, KubeApi]]:
    with running_emulator(tmp_path, authorize=True) as handle:
        admin = KubeApi.from_environment(str(handle.kubeconfig))
        admin.request("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd.build_crd())
        created = admin.create(JOB)
        job = parse_job(created)
        for obj in build_driver_rbac(job, "default"):
            admin.create(obj)
        yield handle, admin


def driver_client(handle: EmulatorHandle) -> Any:
    """An API client authenticated as the job's driver ServiceAccount (what the head pod mounts)."""
    sa = next(o for o in handle.list("", "serviceaccounts", "default"))["metadata"]["name"]
    kubeconfig = handle.service_account_kubeconfig("default", sa)
    return kubernetes.config.new_client_from_config(config_file=str(kubeconfig)), sa


def progress(handle: EmulatorHandle) -> dict[str, Any]:
    obj = handle.get("kuberlhf.io", "rlhfjobs", "default", "tiny") or {}
    return (obj.get("status") or {}).get("progress") or {}


def test_progress_document_uses_the_crd_field_names_and_drops_non_finite_values() -> None:
    doc = progress_document(3, 10, {"reward_mean": 0.5, "kl": float("nan"), "samples_per_second": 12.0},
                            "/ckpt/step-3", "2026-01-01T00:00:00Z")
    assert doc == {"step": 3, "totalSteps": 10, "rewardMean": 0.5, "samplesPerSecond": 12.0,
                   "lastCheckpoint": "/ckpt/step-3", "updatedAt": "2026-01-01T00:00:00Z"}


def test_progress_document_reports_the_mean_turns_of_environment_runs_only() -> None:
    single = progress_document(1, 2, {"reward_mean": 0.5}, None, "2026-01-01T00:00:00Z")
    episodes = progress_document(1, 2, {"reward_mean": 0.5, "turns_mean": 2.25, "turns_max": 3.0}, None,
                                 "2026-01-01T00:00:00Z")
    assert "turnsMean" not in single
    assert episodes["turnsMean"] == 2.25 and "turnsMax" not in episodes
    Progress.model_validate(episodes)  # the CRD's own model accepts what the driver sends


def test_reports_are_coalesced_and_the_last_step_always_lands(
        cluster: tuple[EmulatorHandle, KubeApi]) -> None:
    handle, _ = cluster
    client, sa = driver_client(handle)
    reporter = StatusReporter("tiny", "default", api_client=client, min_interval_s=0.3)
    started = time.monotonic()
    for step in range(1, 51):
        reporter.report(step, 50, {"reward_mean": step / 50}, None)
        time.sleep(0.01)
    assert time.monotonic() - started < 2.0
    reporter.close()
    assert progress(handle)["step"] == 50 and progress(handle)["rewardMean"] == 1.0
    patches = [r for r in handle.requests(f"system:serviceaccount:default:{sa}") if r.method == "PATCH"]
    assert all(r.status == 200 and r.subresource == "status" for r in patches)
    assert 2 <= len(patches) <= 5, f"{len(patches)} PATCHes for 50 steps at a 0.3 s interval"
    assert reporter.failures == 0


def test_driver_identity_may_patch_only_its_own_job(cluster: tuple[EmulatorHandle, KubeApi]) -> None:
    handle, admin = cluster
    admin.create({**JOB, "metadata": {"name": "other", "namespace": "default"}})
    client, sa = driver_client(handle)
    reporter = StatusReporter("other", "default", api_client=client, min_interval_s=0.0)
    reporter.report(1, 5, {}, None)
    reporter.close()
    assert reporter.failures == 1 and reporter.sent == 0
    denied = handle.requests(f"system:serviceaccount:default:{sa}")
    assert [(r.name, r.status) for r in denied] == [("other", 403)]
    other = admin.get(object_path("kuberlhf.io/v1alpha1", "RLHFJob", "default", "other")) or {}
    assert "status" not in other


def test_an_unreachable_api_never_stalls_training(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    configuration = kubernetes.client.Configuration()
    configuration.host = f"http://127.0.0.1:{port}"
    configuration.retries = False
    reporter = StatusReporter("tiny", "default", api_client=kubernetes.client.ApiClient(configuration),
                              min_interval_s=0.0, timeout_s=0.5)
    with caplog.at_level(logging.WARNING, logger="kuberlhf.status"):
        started = time.monotonic()
        for step in range(200):
            reporter.report(step, 200, {"reward_mean": 0.1}, None)
        assert time.monotonic() - started < 0.5
        reporter.close(timeout_s=3)
    assert reporter.sent == 0 and reporter.failures >= 1
    warnings = [r for r in caplog.records if "cannot report progress" in r.getMessage()]
    assert len(warnings) == 1


def test_from_environment_needs_the_job_coordinates(monkeypatch: pytest.MonkeyPatch,
                                                    cluster: tuple[EmulatorHandle, KubeApi]) -> None:
    handle, _ = cluster
    monkeypatch.delenv("KUBERLHF_JOB_NAME", raising=False)
    monkeypatch.delenv("KUBERLHF_NAMESPACE", raising=False)
    assert from_environment() is None
    monkeypatch.setenv("KUBERLHF_JOB_NAME", "tiny")
    monkeypatch.setenv("KUBERLHF_NAMESPACE", "default")
    monkeypatch.setenv("KUBECONFIG", str(handle.kubeconfig))
    reporter = from_environment(min_interval_s=0.0)
    assert reporter is not None
    reporter(9, 10, {"kl": 0.02}, "/ckpt/9")
    reporter.close()
    assert progress(handle)["step"] == 9 and progress(handle)["lastCheckpoint"] == "/ckpt/9"
