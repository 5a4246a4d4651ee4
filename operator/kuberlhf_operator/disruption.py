"""The job's PodDisruptionBudget: no voluntary eviction of its Ray pods while it trains.

The ranks of a job are wired together when it starts (DeepSpeed worlds, the weight-sync group,
the driver on the head), so evicting any one Ray pod, say for a node drain, fails the whole run
back to its last checkpoint. `maxUnavailable: 0` makes the eviction API refuse such evictions; the
drain waits and says which budget blocks it, so an admin can suspend the job (its checkpoint is
taken on SIGTERM) and drain again. `unhealthyPodEvictionPolicy: AlwaysAllow` keeps a pod that is
not Ready (a job that never got going) from blocking drains: there is no training to protect.

The budget selects the head and the worker groups by role, not the K8sJobMode submitter, which only
relays the entrypoint and ends by itself. Deleting pods (suspend, a finished job) is not an
eviction, so the budget never gets in KubeRay's way.
"""

from __future__ import annotations

from typing import Any

from kuberlhf.api import RLHFJob
from kuberlhf.topology import worker_groups
from kuberlhf_operator.names import JOB_LABEL, ROLE_LABEL, child_names, object_meta


def ray_roles(job: RLHFJob) -> list[str]:
    """The `kuberlhf.io/role` of every Ray pod of the job: the head and each worker group."""
    return ["head", *(group.role for group in worker_groups(job.spec))]


def build_pod_disruption_budget(job: RLHFJob, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": object_meta(job, namespace, child_names(job).pod_disruption_budget),
        "spec": {
            "maxUnavailable": 0,
            "selector": {
                "matchLabels": {JOB_LABEL: job.metadata.name},
                "matchExpressions": [{"key": ROLE_LABEL, "operator": "In", "values": ray_roles(job)}],
            },
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }
