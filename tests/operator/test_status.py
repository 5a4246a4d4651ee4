"""RayJob / RayCluster status → RLHFJob phase and conditions (pure projection)."""

from __future__ import annotations

from typing import Any

import pytest

from kuberlhf_operator import status as st

pytestmark = pytest.mark.unit

NOW = "2026-11-25T12:00:00Z"
LATER = "2026-11-25T12:05:00Z"


def rayjob(deployment: str | None, job_status: str | None = None, **extra: Any) -> dict[str, Any]:
    status = {k: v for k, v in {"jobDeploymentStatus": deployment, "jobStatus": job_status}.items() if v}
    return {"metadata": {"name": "j-ray"}, "status": {**status, **extra}}


def ready_cluster(generation: int = 1, observed: int = 1, head: str = "True") -> dict[str, Any]:
    return {"metadata": {"generation": generation}, "status": {
        "observedGeneration": observed,
        "conditions": [{"type": "HeadPodReady", "status": head},
                       {"type": "RayClusterProvisioned", "status": "True"}],
    }}


def by_type(conditions: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in conditions}


@pytest.mark.parametrize(("deployment", "job_status", "phase"), [
    (None, None, "Launching"),
    ("Waiting", None, "Launching"),
    ("Initializing", None, "Launching"),
    ("Retrying", None, "Launching"),
    ("Running", "PENDING", "Running"),
    ("Running", "RUNNING", "Running"),
    ("Suspending", "RUNNING", "Suspended"),
    ("Suspended", "STOPPED", "Suspended"),
    ("Complete", "SUCCEEDED", "Succeeded"),
    ("Complete", "FAILED", "Failed"),
    ("Complete", "STOPPED", "Failed"),
    ("Failed", "FAILED", "Failed"),
    ("ValidationFailed", None, "Failed"),
])
def test_every_deployment_status_maps_to_one_phase(deployment: str | None, job_status: str | None,
                                                    phase: str) -> None:
    assert st.phase_of(rayjob(deployment, job_status)) == phase


def test_no_rayjob_is_pending_until_launched_then_launching() -> None:
    assert st.phase_of(None) == "Pending"
    assert st.project({}, None, None, NOW)["phase"] == "Pending"
    assert st.project({"rayJobName": "j-ray"}, None, None, NOW)["phase"] == "Launching"


@pytest.mark.parametrize(("cluster", "ready"), [
    (None, False),
    (ready_cluster(), True),
    (ready_cluster(head="False"), False),
    (ready_cluster(generation=2, observed=1), False),
    ({"status": {"state": "ready"}}, True),
    ({"status": {"state": "suspended"}}, False),
])
def test_cluster_readiness_follows_kuberay_conditions_or_legacy_state(cluster: dict[str, Any] | None,
                                                                     ready: bool) -> None:
    assert st.cluster_ready(cluster) is ready


def test_running_job_has_cluster_ready_and_training_conditions() -> None:
    result = st.project({}, rayjob("Running", "RUNNING", rayClusterName="j-ray-abcde"), ready_cluster(), NOW)
    conditions = by_type(result["conditions"])
    assert result["phase"] == "Running"
    assert conditions["ClusterReady"]["status"] == "True"
    assert conditions["Training"]["status"] == "True"
    assert conditions["Complete"]["status"] == "False" and conditions["Failed"]["status"] == "False"
    assert result["rayClusterName"] == "j-ray-abcde"
    assert result["startTime"] == NOW


def test_failed_job_carries_kuberay_message_and_completion_time() -> None:
    job = rayjob("Failed", "FAILED", message="driver exited with code 1", endTime=LATER)
    result = st.project({"startTime": NOW}, job, None, LATER)
    conditions = by_type(result["conditions"])
    assert result["phase"] == "Failed"
    assert conditions["Failed"]["status"] == "True"
    assert conditions["Failed"]["message"] == "driver exited with code 1"
    assert result["completionTime"] == LATER and "startTime" not in result
    assert conditions["ClusterReady"]["reason"] == "ClusterDeleted"


def test_transition_time_moves_only_when_a_condition_flips() -> None:
    first = st.project({}, rayjob("Running", "RUNNING"), ready_cluster(), NOW)
    second = st.project(first, rayjob("Running", "RUNNING"), None, LATER)
    conditions = by_type(second["conditions"])
    assert conditions["Training"]["lastTransitionTime"] == NOW
    assert conditions["ClusterReady"]["lastTransitionTime"] == LATER
    assert conditions["ClusterReady"]["status"] == "False"


def test_projection_never_contains_progress_so_merge_patches_keep_it() -> None:
    current = {"progress": {"step": 5}, "phase": "Running"}
    result = st.project(current, rayjob("Complete", "SUCCEEDED"), None, NOW)
    assert "progress" not in result
    assert st.changed_keys(current, result)["phase"] == "Succeeded"


def test_unchanged_observation_yields_an_empty_patch() -> None:
    first = st.project({}, rayjob("Running", "RUNNING"), ready_cluster(), NOW)
    again = st.project(first, rayjob("Running", "RUNNING"), ready_cluster(), LATER)
    assert st.changed_keys(first, again) == {}


def test_validation_verdicts_keep_other_conditions_and_set_pending_once() -> None:
    launched = st.project({"rayJobName": "j-ray"}, rayjob("Running", "RUNNING"), ready_cluster(), NOW)
    message = "cannot change spec.algorithm"
    verdict = st.validated(launched, False, "ImmutableFieldChanged", message, LATER, 3)
    conditions = by_type(verdict["conditions"])
    assert conditions["Validated"] == {
        "type": "Validated", "status": "False", "reason": "ImmutableFieldChanged",
        "message": message, "lastTransitionTime": LATER, "observedGeneration": 3}
    assert conditions["Training"]["status"] == "True"
    assert "phase" not in verdict and "observedGeneration" not in verdict
    fresh = st.validated({}, True, "Valid", "", NOW, 1)
    assert fresh["phase"] == "Pending" and fresh["observedGeneration"] == 1


def test_a_finished_job_keeps_its_outcome_when_the_rayjob_is_deleted_later() -> None:
    finished = st.project({"rayJobName": "j-ray"}, rayjob("Failed", "FAILED", message="oom"), None, NOW)
    assert st.project(finished, None, None, LATER) == {}
