"""Network least privilege: who may open connections to a job's Ray pods and reward servers.

Ray's GCS, object manager, dashboard (job submission = code execution) and the reward servers
listen on the pod network, where by default any pod in the cluster could reach them. One
NetworkPolicy per job admits:

- every pod of the same job (`kuberlhf.io/job=<job>`: head, workers, the K8sJobMode submitter)
  on every port: Ray picks worker and object-manager ports dynamically, and the reward servers
  are reached by the job's own rollout workers;
- the Ray dashboard / job API port (8265) from the kuberlhf operator's pods
  (`kuberlhf.io/operator=true`) in the operator's namespace, and from the KubeRay operator's pods
  (`app.kubernetes.io/name=kuberay-operator`), which polls the job's status there, in KubeRay's
  namespace.

Each operator peer pins its namespace by `kubernetes.io/metadata.name`, a label the API server sets
on every namespace and no user can change: a pod label alone is only as trustworthy as whoever may
create pods, and anyone allowed to run a pod in any namespace could label it `kuberay-operator`.
The operator learns its own namespace from the downward API (POD_NAMESPACE, set by the chart);
KubeRay's is configured (`kuberay.namespace` in the chart, `--kuberay-namespace`).

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

from dataclasses import dataclass
from typing import Any

from kuberlhf.api import RLHFJob
from kuberlhf_operator.names import JOB_LABEL, child_names, object_meta

DASHBOARD_PORT = 8265
OPERATOR_LABEL = "kuberlhf.io/operator"
KUBERAY_OPERATOR_LABELS = {"app.kubernetes.io/name": "kuberay-operator"}
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
# Where KubeRay's own kustomize install (config/default) puts its operator.
DEFAULT_KUBERAY_NAMESPACE = "ray-system"


@dataclass(frozen=True)
class Peers:
    """The namespaces of the two operators that call a job's dashboard.

    `operator_namespace` None means the job's own namespace: the chart's default install puts the
    operator beside the jobs it handles, and a local `kuberlhf render` previews that install.
    """

    operator_namespace: str | None = None
    kuberay_namespace: str = DEFAULT_KUBERAY_NAMESPACE


def namespace_selector(namespace: str) -> dict[str, Any]:
    return {"matchLabels": {NAMESPACE_NAME_LABEL: namespace}}


def job_selector(job: RLHFJob) -> dict[str, Any]:
    """Every pod of this job, and only this job: the label all its pod templates carry."""
    return {"matchLabels": {JOB_LABEL: job.metadata.name}}


def ingress_rules(job: RLHFJob, namespace: str, peers: Peers) -> list[dict[str, Any]]:
    dashboard = [{"protocol": "TCP", "port": DASHBOARD_PORT}]
    operator_namespace = peers.operator_namespace or namespace
    return [
        {"from": [{"podSelector": job_selector(job)}]},
        {
            "from": [
                {"namespaceSelector": namespace_selector(operator_namespace),
                 "podSelector": {"matchLabels": {OPERATOR_LABEL: "true"}}},
                {"namespaceSelector": namespace_selector(peers.kuberay_namespace),
                 "podSelector": {"matchLabels": dict(KUBERAY_OPERATOR_LABELS)}},
            ],
            "ports": dashboard,
        },
    ]


def build_network_policy(job: RLHFJob, namespace: str, peers: Peers | None = None) -> dict[str, Any]:
    """The job's ingress policy (see the module docstring for what it admits and why)."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": object_meta(job, namespace, child_names(job).network_policy),
        "spec": {
            "podSelector": job_selector(job),
            "policyTypes": ["Ingress"],
            "ingress": ingress_rules(job, namespace, peers or Peers()),
        },
    }
