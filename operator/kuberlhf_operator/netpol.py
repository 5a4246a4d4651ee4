"""Network least privilege: who may open connections to a job's Ray pods and reward servers.

Ray's GCS, object manager, dashboard (job submission = code execution) and the reward servers
listen on the pod network, where by default any pod in the cluster could reach them. One
NetworkPolicy per job admits:

- every pod of the same job (`kuberlhf.io/job=<job>`: head, workers, the K8sJobMode submitter)
  on every port: Ray picks worker and object-manager ports dynamically, and the reward servers
  are reached by the job's own rollout workers;
- the Ray dashboard / job API port (8265) from the kuberlhf operator's pods in the same namespace
  (`kuberlhf.io/operator=true`) and from the KubeRay operator's pods in any namespace
  (`app.kubernetes.io/name=kuberay-operator`), which polls the job's status there.

Nothing else gets in. Egress stays open: model hubs, object stores and the API server (the driver
patches its status) live at addresses no portable policy can name.

Why not KubeRay's own `rayClusterSpec.networkPolicy`: in KubeRay v1.7.0 it sits behind the alpha
`RayClusterNetworkPolicy` feature gate, off by default, and KubeRay rejects a RayCluster that sets
it while the gate is off, so every job would fail on a default KubeRay install. A plain
networking.k8s.io/v1 NetworkPolicy works with any KubeRay and is enforced by any CNI that
implements NetworkPolicy (on one that does not, it is inert, never harmful). Like any policy it
only bites where the CNI enforces it; kubelet probes are not subject to it.
"""

from __future__ import annotations

from typing import Any

from kuberlhf.api import RLHFJob
from kuberlhf_operator.names import JOB_LABEL, child_names, object_meta

DASHBOARD_PORT = 8265
OPERATOR_LABEL = "kuberlhf.io/operator"
KUBERAY_OPERATOR_LABELS = {"app.kubernetes.io/name": "kuberay-operator"}


def job_selector(job: RLHFJob) -> dict[str, Any]:
    """Every pod of this job, and only this job: the label all its pod templates carry."""
    return {"matchLabels": {JOB_LABEL: job.metadata.name}}


def ingress_rules(job: RLHFJob) -> list[dict[str, Any]]:
    dashboard = [{"protocol": "TCP", "port": DASHBOARD_PORT}]
    return [
        {"from": [{"podSelector": job_selector(job)}]},
        {
            "from": [
                {"podSelector": {"matchLabels": {OPERATOR_LABEL: "true"}}},
                {"namespaceSelector": {}, "podSelector": {"matchLabels": dict(KUBERAY_OPERATOR_LABELS)}},
            ],
            "ports": dashboard,
        },
    ]


def build_network_policy(job: RLHFJob, namespace: str) -> dict[str, Any]:
    """The job's ingress policy (see the module docstring for what it admits and why)."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": object_meta(job, namespace, child_names(job).network_policy),
        "spec": {
            "podSelector": job_selector(job),
            "policyTypes": ["Ingress"],
            "ingress": ingress_rules(job),
        },
    }
