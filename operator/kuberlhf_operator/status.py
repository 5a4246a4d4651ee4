"""RayJob / RayCluster status → RLHFJob phase and conditions (pure).

The operator never guesses: what the user sees in `kubectl get rlhfjobs` is a projection of
what KubeRay reports, recomputed from scratch on every RayJob or RayCluster event. Keys the
operator does not own (status.progress, written by the driver) never appear in the result,
so a merge patch of it cannot clobber them.
"""

from __future__ import annotations

from dataclasses import dataclass

from kuberlhf.kube import Obj

PENDING, LAUNCHING, RUNNING, SUSPENDED, SUCCEEDED, FAILED = (
    "Pending", "Launching", "Running", "Suspended", "Succeeded", "Failed")
PHASES = (PENDING, LAUNCHING, RUNNING, SUSPENDED, SUCCEEDED, FAILED)
TERMINAL_PHASES = (SUCCEEDED, FAILED)
CONDITION_TYPES = ("Validated", "DependenciesReady", "ClusterReady", "Training", "Complete", "Failed")


@dataclass(frozen=True)
class Condition:
    type: str
    status: bool
    reason: str
    message: str = ""


def cluster_ready(raycluster: Obj | None) -> bool:
    """KubeRay ≥1.2 readiness (HeadPodReady + RayClusterProvisioned, current generation), else state."""
    if not raycluster:
        return False
    status = raycluster.get("status") or {}
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    if "HeadPodReady" in conditions or "RayClusterProvisioned" in conditions:
        observed = status.get("observedGeneration")
        generation = (raycluster.get("metadata") or {}).get("generation")
        current = observed is None or generation is None or observed >= generation
        provisioned = conditions.get("RayClusterProvisioned") == "True"
        return conditions.get("HeadPodReady") == "True" and provisioned and current
    return status.get("state") == "ready"


def phase_of(rayjob: Obj | None) -> str:
    """The RLHFJob phase for a RayJob's jobDeploymentStatus / jobStatus."""
    if rayjob is None:
        return PENDING
    status = rayjob.get("status") or {}
    deployment = status.get("jobDeploymentStatus") or ""
    job_status = status.get("jobStatus") or ""
    if deployment in ("Complete", "Failed", "ValidationFailed"):
        return SUCCEEDED if deployment == "Complete" and job_status in ("", "SUCCEEDED") else FAILED
    if deployment in ("Suspending", "Suspended"):
        return SUSPENDED
    if deployment == "Running":
        return RUNNING
    return LAUNCHING


def conditions_for(phase: str, rayjob: Obj | None, raycluster: Obj | None) -> list[Condition]:
    """ClusterReady, Training, Complete and Failed for one observation (Validated is the handlers')."""
    status = (rayjob or {}).get("status") or {}
    deployment = status.get("jobDeploymentStatus") or "NotCreated"
    job_status = status.get("jobStatus") or ""
    message = status.get("message") or ""
    ready = cluster_ready(raycluster)
    training = phase == RUNNING and job_status == "RUNNING"
    not_training = f"RayJob is {deployment}" + (f", job {job_status}" if job_status else "")
    return [
        Condition("ClusterReady", ready, "ClusterReady" if ready else
                  "ClusterDeleted" if phase in (SUSPENDED, *TERMINAL_PHASES) else "ClusterStarting",
                  f"RayCluster {status.get('rayClusterName', '')} is ready" if ready else ""),
        Condition("Training", training, "DriverRunning" if training else f"Deployment{deployment}",
                  "" if training else not_training),
        Condition("Complete", phase == SUCCEEDED, "JobSucceeded" if phase == SUCCEEDED else "NotComplete"),
        Condition("Failed", phase == FAILED, f"Deployment{deployment}" if phase == FAILED else "NotFailed",
                  message if phase == FAILED else ""),
    ]


def merge_conditions(
    existing: list[Obj], updates: list[Condition], now: str, generation: int | None
) -> list[Obj]:
    """Kubernetes condition semantics: lastTransitionTime moves only when the status flips."""
    by_type = {c.get("type"): dict(c) for c in existing}
    for update in updates:
        status = "True" if update.status else "False"
        old = by_type.get(update.type)
        changed = old is None or old.get("status") != status
        by_type[update.type] = {
            "type": update.type, "status": status, "reason": update.reason, "message": update.message,
            "lastTransitionTime": now if changed else (old or {}).get("lastTransitionTime", now),
            **({"observedGeneration": generation} if generation is not None else {}),
        }
    ordered = [by_type.pop(t) for t in CONDITION_TYPES if t in by_type]
    return ordered + list(by_type.values())


def project(current: Obj, rayjob: Obj | None, raycluster: Obj | None, now: str) -> Obj:
    """The operator-owned status keys for an RLHFJob whose spec is valid and whose children exist.

    `current` is the RLHFJob's whole status (only its conditions and timestamps are read).
    A Pending job whose RayJob has not appeared yet stays Launching once launched; a finished
    job stays as it ended when KubeRay later deletes its RayJob (TTL / deletionStrategy).
    """
    if rayjob is None and current.get("phase") in TERMINAL_PHASES:
        return {}
    phase = phase_of(rayjob)
    if phase == PENDING and current.get("rayJobName"):
        phase = LAUNCHING
    rj_status = (rayjob or {}).get("status") or {}
    conditions = conditions_for(phase, rayjob, raycluster)
    result: Obj = {
        "phase": phase,
        "conditions": merge_conditions(current.get("conditions") or [], conditions, now,
                                       current.get("observedGeneration")),
    }
    if rj_status.get("rayClusterName"):
        result["rayClusterName"] = rj_status["rayClusterName"]
    if rj_status.get("dashboardURL"):
        result["dashboard"] = rj_status["dashboardURL"]
    if phase in (RUNNING, *TERMINAL_PHASES) and not current.get("startTime"):
        result["startTime"] = rj_status.get("startTime") or now
    if phase in TERMINAL_PHASES and not current.get("completionTime"):
        result["completionTime"] = rj_status.get("endTime") or now
    if phase == FAILED and rj_status.get("message"):
        result["message"] = rj_status["message"]
    return result


def validated(current: Obj, ok: bool, reason: str, message: str, now: str, generation: int | None) -> Obj:
    """The status keys for a validation verdict: the Validated condition, and Pending for a new job."""
    verdict = Condition("Validated", ok, reason, message)
    existing = current.get("conditions") or []
    result: Obj = {"conditions": merge_conditions(existing, [verdict], now, generation)}
    if not current.get("phase"):
        result["phase"] = PENDING
    if ok:
        result["observedGeneration"] = generation
    return result


def held(current: Obj, failed: bool, reason: str, message: str, now: str, generation: int | None) -> Obj:
    """A job held back by the jobs it uses: Pending while it waits for them, Failed when one failed
    or does not exist (the DependenciesReady condition says which)."""
    waiting = Condition("DependenciesReady", False, reason, message)
    result: Obj = {
        "conditions": merge_conditions(current.get("conditions") or [], [waiting], now, generation),
        "phase": FAILED if failed else PENDING,
        "observedGeneration": generation,
    }
    if failed:
        result["message"] = message
        result.setdefault("completionTime", current.get("completionTime") or now)
    return result


def changed_keys(current: Obj, patch: Obj) -> Obj:
    """Only the keys whose value differs, so an unchanged observation costs no API call."""
    return {k: v for k, v in patch.items() if current.get(k) != v}
