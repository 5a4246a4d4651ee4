"""The driver's identity: a ServiceAccount that may patch its own RLHFJob's status, nothing else.

The driver (the RayJob entrypoint, on the head pod) reports progress into RLHFJob.status.
Pinning the Role to the job's name with resourceNames means a compromised or buggy job can
neither read nor touch other jobs in the namespace; no wildcard appears anywhere.
"""

from __future__ import annotations

from typing import Any

from kuberlhf.api import GROUP, PLURAL, RLHFJob
from kuberlhf_operator.names import child_names, object_meta


def driver_rules(job: RLHFJob) -> list[dict[str, Any]]:
    name = job.metadata.name
    # The status reporter merge-patches blind: it never reads, so it is not allowed to.
    return [
        {
            "apiGroups": [GROUP],
            "resources": [f"{PLURAL}/status"],
            "resourceNames": [name],
            "verbs": ["patch"],
        },
    ]


def build_driver_rbac(job: RLHFJob, namespace: str) -> list[dict[str, Any]]:
    """ServiceAccount, Role and RoleBinding, in the order they must be applied."""
    names = child_names(job)
    service_account = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": object_meta(job, namespace, names.service_account),
    }
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": object_meta(job, namespace, names.role),
        "rules": driver_rules(job),
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": object_meta(job, namespace, names.role_binding),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": names.role},
        "subjects": [{"kind": "ServiceAccount", "name": names.service_account, "namespace": namespace}],
    }
    return [service_account, role, binding]
