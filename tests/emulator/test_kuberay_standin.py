"""The KubeRay TEST STAND-IN walks a RayJob through KubeRay 1.7's states (rayjob_controller.go)."""

from __future__ import annotations

import threading
from typing import Any

from kuberlhf.api import parse_job
from kuberlhf_operator.builders import build_rayjob
from kuberlhf_operator.kubeapi import KubeApi
from tests.emulator import EmulatorHandle
from tests.emulator.kuberay_standin import Obj, Runner, sleep_runner
from tests.operator.conftest import admin, cluster, emulator, running_standin, wait_for  # noqa: F401
from tests.operator.test_handlers import tiny_job

RAYJOBS = "/apis/ray.io/v1/namespaces/default/rayjobs"


def create_rayjob(api: KubeApi, **spec: Any) -> None:
    rayjob = build_rayjob(parse_job(tiny_job()), "default")
    rayjob["spec"].update(spec)
    api.create(rayjob)


def rayjob_status(handle: EmulatorHandle) -> dict[str, Any]:
    return (handle.get("ray.io", "rayjobs", "default", "tiny-ray") or {}).get("status") or {}


def counting(runner: Runner, calls: list[threading.Event]) -> Runner:
    def run(rayjob: Obj, configmap: Obj | None, cancel: threading.Event) -> int:
        calls.append(cancel)
        return runner(rayjob, configmap, cancel)

    return run


def test_suspend_deletes_the_pods_resets_the_status_and_resume_starts_a_new_cluster(
        cluster: EmulatorHandle, admin: KubeApi) -> None:  # noqa: F811
    calls: list[threading.Event] = []
    with running_standin(cluster, runner=counting(sleep_runner(30.0), calls)):
        create_rayjob(admin)
        wait_for(lambda: rayjob_status(cluster).get("jobDeploymentStatus") == "Running", what="Running")
        first = rayjob_status(cluster)["rayClusterName"]
        admin.merge_patch(f"{RAYJOBS}/tiny-ray", {"spec": {"suspend": True}})
        wait_for(lambda: rayjob_status(cluster).get("jobDeploymentStatus") == "Suspended", what="Suspended")
        status = rayjob_status(cluster)
        assert (status["jobStatus"], status["rayClusterName"], status["jobId"]) == ("", "", "")
        assert cluster.list("ray.io", "rayclusters") == [] and calls[0].is_set(), "the pods were not deleted"
        admin.merge_patch(f"{RAYJOBS}/tiny-ray", {"spec": {"suspend": False}})
        wait_for(lambda: rayjob_status(cluster).get("jobDeploymentStatus") == "Running", what="Running again")
        assert rayjob_status(cluster)["rayClusterName"] not in ("", first)
        assert len(calls) == 2 and not calls[1].is_set()


def test_a_failed_driver_is_retried_on_a_new_cluster_up_to_the_backoff_limit(
        cluster: EmulatorHandle, admin: KubeApi) -> None:  # noqa: F811
    calls: list[threading.Event] = []
    with running_standin(cluster, runner=counting(sleep_runner(0.1, returncode=3), calls)):
        create_rayjob(admin, backoffLimit=1)
        wait_for(lambda: rayjob_status(cluster).get("jobDeploymentStatus") == "Failed", what="Failed")
        status = rayjob_status(cluster)
    assert (status["failed"], status["reason"], len(calls)) == (2, "AppFailed", 2)


def test_active_deadline_fails_the_rayjob_with_deadline_exceeded_and_no_retry(
        cluster: EmulatorHandle, admin: KubeApi) -> None:  # noqa: F811
    calls: list[threading.Event] = []
    with running_standin(cluster, runner=counting(sleep_runner(30.0), calls)):
        create_rayjob(admin, activeDeadlineSeconds=2, backoffLimit=3)
        wait_for(lambda: rayjob_status(cluster).get("jobDeploymentStatus") == "Failed", what="Failed")
        status = rayjob_status(cluster)
    assert (status["reason"], status["failed"], len(calls)) == ("DeadlineExceeded", 1, 1)


def test_a_finished_rayjobs_cluster_is_deleted_after_its_ttl_and_the_rayjob_stays(
        cluster: EmulatorHandle, admin: KubeApi) -> None:  # noqa: F811
    with running_standin(cluster, runner=sleep_runner(0.1)):
        create_rayjob(admin, ttlSecondsAfterFinished=2)
        wait_for(lambda: rayjob_status(cluster).get("jobDeploymentStatus") == "Complete", what="Complete")
        assert len(cluster.list("ray.io", "rayclusters")) == 1, "deleted before its TTL"
        wait_for(lambda: cluster.list("ray.io", "rayclusters") == [], what="the cluster gone after the TTL")
        assert rayjob_status(cluster)["jobDeploymentStatus"] == "Complete"
