"""The operator against an unreliable API server: conflicts, server errors, throttling, dropped
watch streams and expired resourceVersions, injected by the emulator's FaultPlan.

The operator must converge to what it reaches on a healthy server (same phase, one of each
child), retry with backoff rather than give up or spin, and stay quiet once the job is done.
"""

from __future__ import annotations

import collections
import time
from pathlib import Path

from kuberlhf_operator.kubeapi import KubeApi, retry_delay
from tests.emulator import EmulatorHandle, LoggedRequest, running_emulator
from tests.emulator.faults import Fault, FaultPlan
from tests.emulator.kuberay_standin import sleep_runner
from tests.operator.conftest import OPERATOR_USER, install_crds, running_operator, running_standin, wait_for
from tests.operator.test_handlers import condition, job_status, tiny_job

RBAC = "rbac.authorization.k8s.io"
CHILDREN = [("", "configmaps"), ("", "serviceaccounts"), (RBAC, "roles"), (RBAC, "rolebindings"),
            ("ray.io", "rayjobs"), ("ray.io", "rayclusters")]
JOB = r"/rlhfjobs/tiny$"


def arm(plan: FaultPlan) -> list[Fault]:
    """One of every failure a real API server produces, aimed at the operator's calls."""
    me = OPERATOR_USER
    faults = [
        # The operator guards status patches with the resourceVersion: a 409 is a real race there.
        # (kopf's own merge patches carry none, so a real server never answers them 409.)
        Fault("PATCH", r"/rlhfjobs/tiny/status$", 409, times=3, user=me),
        Fault("POST", r"/configmaps$", 409, times=1, user=me),         # AlreadyExists for a missing child
        Fault("POST", r"/rayjobs$", 500, times=2, user=me),            # server error on the key create
        Fault("POST", r"/roles$", 503, times=1, user=me),
        Fault("GET", r"/rayjobs/tiny-ray$", 429, times=2, user=me, retry_after_s=1),  # throttled
        Fault("PATCH", JOB, 500, times=1, user=me),                    # kopf's own annotation patch
        Fault("GET", r"/rlhfjobs$", 500, times=1, user=me),            # kopf's initial list
    ]
    for fault in faults:
        plan.add(fault)
    plan.drop_watches(after_events=1, times=6, user=me)
    plan.expire_resumes(times=3, user=me)
    return faults


def gaps(fault: Fault) -> list[float]:
    return [later - earlier for earlier, later in zip(fault.at, fault.at[1:], strict=False)]


def run_job(handle: EmulatorHandle, admin: KubeApi, faulty: bool) -> tuple[list[LoggedRequest], float]:
    """Apply a job, wait for Succeeded, then idle a second: the operator's requests and the time taken."""
    plan = handle.emulator.faults
    with running_standin(handle, runner=sleep_runner(0.5)):
        faults = arm(plan) if faulty else []
        with running_operator(handle):
            started = time.monotonic()
            admin.create(tiny_job())
            wait_for(lambda: job_status(handle).get("phase") == "Succeeded", timeout=40, what="Succeeded")
            took = time.monotonic() - started
            settled = len(handle.requests(OPERATOR_USER))
            time.sleep(1.0)
            idle = len(handle.requests(OPERATOR_USER)) - settled
    assert idle <= 2, f"the operator kept calling the API after the job finished ({idle} requests in 1 s)"
    for fault in faults:
        assert fault.injected == fault.times, f"fault not consumed: {fault}"
        if fault.status != 409:  # a conflict is answered by re-reading the object, then retrying at once
            assert all(gap >= 0.04 for gap in gaps(fault)), f"retried without backoff: {fault}"
    throttled = next((f for f in faults if f.status == 429), None)
    assert throttled is None or all(gap >= 0.95 for gap in gaps(throttled)), "Retry-After ignored"
    return handle.requests(OPERATOR_USER), took


def test_operator_converges_through_injected_api_faults(cluster: EmulatorHandle, admin: KubeApi,
                                                        tmp_path: Path) -> None:
    calls, took = run_job(cluster, admin, faulty=True)
    plan = cluster.emulator.faults
    injected = dict(plan.counts)
    assert {"409", "410", "429", "500", "503", "watch-drop"} <= injected.keys(), injected

    status = job_status(cluster)
    assert status["phase"] == "Succeeded" and condition(status, "Complete")["status"] == "True"
    assert condition(status, "Validated")["status"] == "True"
    for kind in CHILDREN:
        assert len(cluster.list(*kind, "default")) == 1, f"expected exactly one {kind[1]}"
    created = collections.Counter(r.resource for r in calls if r.method == "POST" and r.status == 201
                                  and r.resource != "events")
    assert created["rayjobs"] == 1 and set(created.values()) == {1}, created

    # The same job on a healthy server: the faulty run may cost retries, not a request storm.
    with_faults = len(calls)
    (tmp_path / "healthy").mkdir()
    with running_emulator(tmp_path / "healthy") as healthy:
        install_crds(healthy)
        healthy_admin = KubeApi.from_environment(str(healthy.kubeconfig))
        healthy_calls, healthy_took = run_job(healthy, healthy_admin, faulty=False)
        assert job_status(healthy)["phase"] == status["phase"]
    retried = with_faults - len(healthy_calls)
    assert retried <= 4 * plan.total, f"{with_faults} requests with faults vs {len(healthy_calls)} without"
    print(f"\nfaults injected: {plan.total} {injected}; operator requests {with_faults} (healthy: "
          f"{len(healthy_calls)}); apply → Succeeded {took:.1f} s (healthy: {healthy_took:.1f} s)")


def test_retry_delay_honours_retry_after_within_a_cap() -> None:
    import random

    rng = random.Random(0)
    assert retry_delay(0, "2", rng) == 2.0
    assert retry_delay(0, "86400", rng) == 5.0
    delays = [retry_delay(attempt, None, rng) for attempt in range(10)]
    assert 0.05 <= delays[0] <= 0.1 and all(d <= 5.0 for d in delays)
    assert delays[4] > delays[0], "backoff grows with the attempt"
    assert retry_delay(1, "Wed, 21 Oct 2015 07:28:00 GMT", rng) <= 0.2


def test_fault_plan_injects_exactly_what_it_was_armed_with() -> None:
    plan = FaultPlan()
    plan.add(Fault("PATCH", r"/status$", 409, times=2, user="op"))
    assert plan.intercept("PATCH", "/x/status", "someone-else", False) is None
    assert plan.intercept("GET", "/x/status", "op", False) is None
    first = plan.intercept("PATCH", "/x/status", "op", False)
    assert first is not None and first.status == 409 and first.reason == "Conflict"
    assert plan.intercept("PATCH", "/x/status", "op", False) is not None
    assert plan.intercept("PATCH", "/x/status", "op", False) is None
    plan.expire_resumes(1)
    assert plan.expire_watch("op") and not plan.expire_watch("op")
    assert plan.counts == {"409": 2, "410": 1}
