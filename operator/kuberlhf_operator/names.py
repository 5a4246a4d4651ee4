"""Names, labels and ownership of the objects one RLHFJob owns.

Child names are a pure function of the job's name: the operator finds its children again by
name on every reconcile (idempotency), and users can guess them (`kubectl get rayjob
<job>-ray`). The API caps job names at 40 characters so every "<job>-<suffix>" here fits the
63-character DNS label limit, and the RayJob's name stays within KubeRay's own limit of 47
(it appends 6 characters to name the RayCluster).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kuberlhf.api import API_VERSION, KIND, RLHFJob

APP_NAME = "kuberlhf"
MANAGED_BY = "kuberlhf-operator"
JOB_LABEL = "kuberlhf.io/job"
ROLE_LABEL = "kuberlhf.io/role"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


@dataclass(frozen=True)
class ChildNames:
    """The name of every object the operator creates for one RLHFJob."""

    configmap: str
    rayjob: str
    service_account: str
    role: str
    role_binding: str
    pvc: str
    model_cache: str
    network_policy: str
    pod_disruption_budget: str


def child_names(job: RLHFJob) -> ChildNames:
    name = job.metadata.name
    return ChildNames(
        configmap=f"{name}-spec",
        rayjob=f"{name}-ray",
        service_account=f"{name}-driver",
        role=f"{name}-driver",
        role_binding=f"{name}-driver",
        pvc=f"{name}-checkpoints",
        model_cache=f"{name}-models",
        network_policy=f"{name}-ingress",
        pod_disruption_budget=f"{name}-ray-pods",
    )


def checkpoint_claim(job: RLHFJob) -> str:
    """The PVC the pods mount: the user's existing claim, or the one the operator creates."""
    return job.spec.checkpoint.volume.claim_name or child_names(job).pvc


def model_cache_claim(job: RLHFJob) -> str:
    """The shared model cache the pods mount: the user's existing claim, or the one the operator creates."""
    return job.spec.model_cache.claim_name or child_names(job).model_cache


def common_labels(job: RLHFJob) -> dict[str, str]:
    """Labels on every object of a job, so `kubectl get all -l kuberlhf.io/job=<job>` finds them all."""
    return {
        "app.kubernetes.io/name": APP_NAME,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/instance": job.metadata.name,
        JOB_LABEL: job.metadata.name,
    }


def pod_labels(job: RLHFJob, role: str) -> dict[str, str]:
    return {**common_labels(job), ROLE_LABEL: role}


def job_uid(job: RLHFJob) -> str | None:
    """The RLHFJob's uid when it came from the API server (a local render has none)."""
    extra = job.metadata.model_extra or {}
    uid = extra.get("uid")
    return str(uid) if uid else None


def owner_reference(job: RLHFJob) -> dict[str, Any]:
    """The controller reference that lets Kubernetes garbage-collect children with their RLHFJob.

    Raises ValueError for a job without a uid (not read from the API server): an owner
    reference without one is rejected by the API server.
    """
    uid = job_uid(job)
    if uid is None:
        raise ValueError(f"RLHFJob {job.metadata.name!r} has no metadata.uid: it was not read from the API")
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job.metadata.name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def object_meta(
    job: RLHFJob, namespace: str, name: str, extra_labels: dict[str, str] | None = None
) -> dict[str, Any]:
    """Metadata of a child: common labels, and an owner reference when the job's uid is known."""
    meta: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": {**common_labels(job), **(extra_labels or {})},
    }
    if job_uid(job) is not None:
        meta["ownerReferences"] = [owner_reference(job)]
    return meta
