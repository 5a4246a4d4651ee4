"""The operator killed and restarted at every step of a job's life: the same end state, no
duplicate children, no lost status.

The operator runs as its real process (`kuberlhf operator`) and is killed with SIGKILL, so an
in-flight handler dies with it (a graceful stop would let it finish its writes). The KubeRay
stand-in keeps running while the operator is down, as KubeRay would, and the job "trains"
until the test lets it finish, so each kill point is reached deterministically.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from kuberlhf_operator.kubeapi import KubeApi
from tests.emulator import EmulatorHandle
from tests.emulator.faults import Fault
from tests.emulator.kuberay_standin import KubeRayStandIn, Runner
from tests.operator.conftest import OPERATOR_USER, user_api, wait_for
from tests.operator.test_handlers import JOBS, condition, job_status, tiny_job

RBAC = "rbac.authorization.k8s.io"
CHILDREN = [("", "configmaps"), ("", "serviceaccounts"), (RBAC, "roles"), (RBAC, "rolebindings"),
            ("", "persistentvolumeclaims"), ("networking.k8s.io", "networkpolicies"), ("ray.io", "rayjobs")]
KILL_POINTS = ["before-operator-saw-it", "after-status-before-rayjob", "launching", "running", "suspended",
               "succeeded", "deleting"]
RAYJOB = "/apis/ray.io/v1/namespaces/default/rayjobs/tiny-ray"
PROGRESS = {"step": 7, "totalSteps": 20, "rewardMean": 0.5}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def operator_process(handle: EmulatorHandle) -> Iterator[subprocess.Popen[bytes]]:
    """`kuberlhf operator` as the operator's ServiceAccount; SIGKILLed when the block ends."""
    _, kubeconfig = user_api(handle, OPERATOR_USER)
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    command = [sys.executable, "-c", "from kuberlhf.cli import main; main()", "operator",
               "--health-port", str(free_port()), "--metrics-port", str(free_port())]
    log = (handle.tmp / "operator.log").open("ab")
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        seen = len(handle.requests(OPERATOR_USER))
        wait_for(lambda: proc.poll() is not None or any(
            r.resource == "rlhfjobs" and r.verb == "watch" for r in handle.requests(OPERATOR_USER)[seen:]),
            timeout=30, what="the operator watching RLHFJobs")
        assert proc.poll() is None, (handle.tmp / "operator.log").read_text()
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)
        log.close()


def gated_runner(finish: threading.Event) -> Runner:
    """'Trains' until the test sets `finish` (or KubeRay cancels the attempt)."""

    def run(rayjob: Any, configmap: Any, cancel: threading.Event) -> int:
        while not (finish.is_set() or cancel.is_set()):
            finish.wait(0.02)
        return 0

    return run


def uids(handle: EmulatorHandle) -> dict[str, list[str]]:
    return {plural: [o["metadata"]["uid"] for o in handle.list(group, plural, "default")]
            for group, plural in CHILDREN}


def phase(handle: EmulatorHandle) -> str | None:
    found: str | None = job_status(handle).get("phase")
    return found


def report_progress(admin: KubeApi) -> None:
    """What the driver's StatusReporter writes: the operator must never drop it."""
    admin.merge_patch(f"{JOBS}/tiny/status", {"status": {"progress": PROGRESS}})


def drive_to(point: str, handle: EmulatorHandle, admin: KubeApi, finish: threading.Event) -> None:
    """With the operator up, bring the job to `point`, then return (the caller kills the operator)."""
    if point == "after-status-before-rayjob":
        # Hold the RayJob create back for a moment (three 503s, retried) and stop in between.
        handle.emulator.faults.add(Fault("POST", r"/rayjobs$", 503, times=3, user=OPERATOR_USER))
    admin.create(tiny_job())
    if point == "after-status-before-rayjob":
        wait_for(lambda: handle.get("", "configmaps", "default", "tiny-spec"), what="ConfigMap")
        assert phase(handle) == "Launching", "the launch was not recorded before the children"
        assert handle.get("ray.io", "rayjobs", "default", "tiny-ray") is None, "past the kill point"
        return
    wait_for(lambda: phase(handle) in ("Launching", "Running")
             and handle.get("ray.io", "rayjobs", "default", "tiny-ray") is not None, what="launched")
    if point == "launching":
        return
    wait_for(lambda: phase(handle) == "Running", what="phase Running")
    report_progress(admin)
    if point == "suspended":
        admin.merge_patch(f"{JOBS}/tiny", {"spec": {"suspend": True}})
        wait_for(lambda: phase(handle) == "Suspended", what="phase Suspended")
    elif point in ("succeeded", "deleting"):
        finish.set()
        wait_for(lambda: phase(handle) == "Succeeded", what="phase Succeeded")


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_restarted_operator_reaches_the_same_end_state(point: str, cluster: EmulatorHandle,
                                                         admin: KubeApi) -> None:
    finish = threading.Event()
    api, _ = user_api(cluster, "kuberay-standin")
    token = cluster.add_token("kuberay-standin")
    with KubeRayStandIn(api, cluster.url, token, runner=gated_runner(finish), cluster_ready_after_s=0.5):
        if point == "before-operator-saw-it":
            admin.create(tiny_job())
        else:
            with operator_process(cluster):
                drive_to(point, cluster, admin, finish)
        if point == "after-status-before-rayjob":
            time.sleep(1.0)
            assert cluster.get("ray.io", "rayjobs", "default", "tiny-ray") is None, \
                "the killed operator still created the RayJob"
        # The operator is down: the world moves on without it.
        if point == "suspended":
            admin.merge_patch(f"{JOBS}/tiny", {"spec": {"suspend": False}})
        if point == "deleting":
            admin.request("DELETE", f"{JOBS}/tiny")
        before = uids(cluster)
        seen = cluster.requests(OPERATOR_USER)
        with operator_process(cluster):
            if point == "deleting":
                wait_for(lambda: all(not v for v in uids(cluster).values()), what="children collected")
                assert cluster.get("kuberlhf.io", "rlhfjobs", "default", "tiny") is None
                return
            if point == "succeeded":
                wait_for(lambda: any(r.method == "GET" and r.name == "tiny-ray"
                                     for r in cluster.requests(OPERATOR_USER)[len(seen):]),
                         what="the restarted operator resuming the job")
                time.sleep(0.3)
            else:
                wait_for(lambda: phase(cluster) == "Running", what="phase Running after the restart")
            if point in ("before-operator-saw-it", "after-status-before-rayjob", "launching"):
                report_progress(admin)
            finish.set()
            # The end state, not its speed (a loaded 2-core runner took over 10 s here once): the
            # phase and the Complete condition, which a full run once read between two patches.
            wait_for(lambda: phase(cluster) == "Succeeded"
                     and condition(job_status(cluster), "Complete").get("status") == "True",
                     timeout=30.0, what="phase Succeeded and condition Complete after the restart")
        after = uids(cluster)

    assert all(len(v) == 1 for v in after.values()), f"duplicate or missing children: {after}"
    if point == "after-status-before-rayjob":
        # Children the killed operator had not created yet (the RayJob, and any it was still to create
        # before that: the kill lands somewhere in the create sequence) are the restarted one's to make.
        before |= {kind: after[kind] for kind, made in before.items() if not made}
    if point != "before-operator-saw-it":
        assert after == before, "the restarted operator re-created children"
    status = job_status(cluster)
    assert status["progress"] == {**status["progress"], **PROGRESS}, "the driver's progress was lost"
    assert condition(status, "Validated")["status"] == "True"
    assert condition(status, "Complete")["status"] == "True"
    assert status["rayJobName"] == "tiny-ray" and status["startTime"] and status["completionTime"]
    creates = [r for r in cluster.requests(OPERATOR_USER) if r.method == "POST" and r.status == 201
               and r.resource == "rayjobs"]
    assert len(creates) == 1


class FinishesMidReconcile(KubeApi):
    """The operator's client, where KubeRay finishes the job while the operator adopts its children,
    and the RayJob's event is handled in that window (kopf runs it in a parallel thread)."""

    def __init__(self, api: KubeApi, admin: KubeApi, on_finish: Any) -> None:
        super().__init__(api.client)
        self.admin, self.on_finish, self.armed = admin, on_finish, False

    def create(self, obj: Any) -> Any:
        if self.armed and obj["kind"] == "ConfigMap":
            self.armed = False
            finished = {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED",
                        "endTime": "2026-01-01T00:00:00Z"}
            rayjob = self.admin.merge_patch(RAYJOB + "/status", {"status": finished})
            self.on_finish(rayjob)
        return super().create(obj)



def test_a_resumed_reconcile_never_undoes_a_finish_reported_while_it_ran(cluster: EmulatorHandle,
                                                                        admin: KubeApi) -> None:
    from kuberlhf_operator.handlers import Reconciler, plain
    from kuberlhf_operator.metrics import Metrics

    operator_api, _ = user_api(cluster, OPERATOR_USER)
    reconciler: Reconciler
    api = FinishesMidReconcile(operator_api, admin,
                               lambda rayjob: reconciler.sync_status("default", "tiny", rayjob))
    reconciler = Reconciler(api, Metrics())
    admin.create(tiny_job())
    reconciler.reconcile(plain(admin.get(f"{JOBS}/tiny")))
    admin.merge_patch(RAYJOB + "/status", {"status": {
        "jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "rayClusterName": "tiny-ray-abc"}})
    reconciler.sync_status("default", "tiny")
    assert phase(cluster) == "Running"

    api.armed = True  # the restarted operator's resume: it reads the RayJob (Running), then adopts
    reconciler.reconcile(plain(admin.get(f"{JOBS}/tiny")))
    assert not api.armed, "KubeRay never finished the job mid-reconcile"
    assert phase(cluster) == "Succeeded", "the resume projected the RayJob it read before the finish"
    assert condition(job_status(cluster), "Complete")["status"] == "True"
