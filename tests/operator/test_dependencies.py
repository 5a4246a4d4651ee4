"""Pipelines on the emulated cluster: a job that uses another job's model (`job:<name>`) waits
for it, starts when it succeeds, and fails saying why when it failed or does not exist."""

from __future__ import annotations

from typing import Any

import pytest

from kuberlhf.api import parse_job
from kuberlhf_operator.dependencies import verdict
from kuberlhf_operator.kubeapi import KubeApi
from tests.emulator import EmulatorHandle
from tests.emulator.kuberay_standin import sleep_runner
from tests.operator.conftest import running_operator, running_standin, wait_for
from tests.operator.test_handlers import condition, events_for, job_status

SHARED = {"volume": {"claimName": "pipeline"}}


def job(name: str, **spec: Any) -> dict[str, Any]:
    body = {"algorithm": "sft", "model": {"actor": "builtin:tiny"}, "data": {"train": "/data/sft.jsonl"},
            "checkpoint": SHARED, **spec}
    return {"apiVersion": "kuberlhf.io/v1alpha1", "kind": "RLHFJob",
            "metadata": {"name": name, "namespace": "default"}, "spec": body}


def rm_after(dependency: str, **spec: Any) -> dict[str, Any]:
    return job("rm", algorithm="rm", model={"actor": f"job:{dependency}"}, **spec)


def found(phase: str | None, claim: str = "pipeline") -> dict[str, Any]:
    return {"metadata": {"name": "sft"}, "spec": {"checkpoint": {"volume": {"claimName": claim}}},
            "status": {"phase": phase} if phase else {}}


@pytest.mark.unit
@pytest.mark.parametrize(
    ("dependency", "ready", "failed", "reason"),
    [
        (None, False, True, "DependencyNotFound"),
        (found("Failed"), False, True, "DependencyFailed"),
        (found("Succeeded", claim="sft-checkpoints"), False, True, "DependencyOnAnotherVolume"),
        (found("Running"), False, False, "WaitingForDependency"),
        (found(None), False, False, "WaitingForDependency"),
        (found("Succeeded"), True, False, "DependenciesSucceeded"),
    ],
)
def test_the_verdict_on_a_job_follows_the_phase_and_volume_of_the_job_it_uses(
    dependency: dict[str, Any] | None, ready: bool, failed: bool, reason: str
) -> None:
    result = verdict(parse_job(rm_after("sft")), {"sft": dependency})
    assert (result.ready, result.failed, result.reason) == (ready, failed, reason)
    assert "sft" in result.message


def test_a_later_stage_applied_with_its_dependency_waits_then_runs_after_it(
    cluster: EmulatorHandle, admin: KubeApi
) -> None:
    with running_operator(cluster), running_standin(cluster, runner=sleep_runner(3.0)):
        admin.create(job("sft"))
        admin.create(rm_after("sft"))
        wait_for(lambda: condition(job_status(cluster, "rm"), "DependenciesReady").get("reason")
                 == "WaitingForDependency", what="rm waiting")
        status = job_status(cluster, "rm")
        assert status["phase"] == "Pending" and "sft" in condition(status, "DependenciesReady")["message"]
        assert cluster.get("ray.io", "rayjobs", "default", "rm-ray") is None, "started before its dependency"
        wait_for(lambda: job_status(cluster, "sft").get("phase") == "Succeeded", what="sft done")
        wait_for(lambda: job_status(cluster, "rm").get("phase") == "Succeeded", what="rm done")
        assert condition(job_status(cluster, "rm"), "DependenciesReady")["status"] == "True"
        # Events are posted after the status patch they report: wait for them, do not race them.
        wait_for(lambda: {"WaitingForDependency", "Launching", "Succeeded"}
                 <= {e["reason"] for e in events_for(cluster, "rm")}, what="rm's events")


def test_a_job_whose_dependency_fails_or_is_missing_fails_naming_it(
    cluster: EmulatorHandle, admin: KubeApi
) -> None:
    with running_operator(cluster), running_standin(cluster, runner=sleep_runner(0.5, returncode=3)):
        admin.create(job("orphan", algorithm="rm", model={"actor": "job:nobody"}))
        wait_for(lambda: job_status(cluster, "orphan").get("phase") == "Failed", what="orphan failed")
        assert "nobody" in condition(job_status(cluster, "orphan"), "DependenciesReady")["message"]

        admin.create(job("sft", backoffLimit=0))
        admin.create(rm_after("sft"))
        wait_for(lambda: job_status(cluster, "rm").get("phase") == "Failed", what="rm failed")
        status = job_status(cluster, "rm")
        assert condition(status, "DependenciesReady")["reason"] == "DependencyFailed"
        assert cluster.get("ray.io", "rayjobs", "default", "rm-ray") is None
        wait_for(lambda: "DependencyFailed" in
                 [e["reason"] for e in events_for(cluster, "rm") if e["type"] == "Warning"], what="a Warning")
