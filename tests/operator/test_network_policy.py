"""The per-job NetworkPolicy: it selects exactly the job's pods and admits only what netpol.py documents.

No CNI runs here, so a small evaluator of NetworkPolicy semantics (the parts the policy uses:
matchLabels, podSelector / namespaceSelector peers, ports) answers "may this pod connect to that
port?", and the answers are checked against the documented intent, connection by connection.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kuberlhf import api
from kuberlhf_operator import builders, netpol
from tests.kuberay_schema import builtin_versions, validate_builtin, validate_kuberay

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "team-a"
UID = "6f1c0b1e-1111-4a4a-9c9c-0123456789ab"
GCS, CLIENT, DASHBOARD, REWARD_SERVER, OBJECT_MANAGER = 6379, 10001, 8265, 8000, 41234


def load(name: str, **metadata: Any) -> api.RLHFJob:
    doc = yaml.safe_load((ROOT / "examples" / f"{name}.yaml").read_text())
    doc["metadata"].update(metadata)
    return api.parse_job(doc)


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"evaluator knows matchLabels only: {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def peer_admits(peer: dict[str, Any], policy_ns: str, pod: dict[str, Any]) -> bool:
    """NetworkPolicyPeer semantics: a podSelector alone means the policy's own namespace."""
    assert "ipBlock" not in peer, "an ipBlock would admit addresses outside the cluster's pod identity"
    if "namespaceSelector" in peer:
        in_namespace = matches(peer["namespaceSelector"], pod["namespace_labels"])
    else:
        in_namespace = pod["namespace"] == policy_ns
    return in_namespace and matches(peer.get("podSelector", {}), pod["labels"])


def admits(policy: dict[str, Any], pod: dict[str, Any], port: int) -> bool:
    spec = policy["spec"]
    for rule in spec["ingress"]:
        ports = rule.get("ports")
        port_ok = not ports or any(p["port"] == port and p.get("protocol", "TCP") == "TCP" for p in ports)
        if port_ok and any(peer_admits(peer, policy["metadata"]["namespace"], pod) for peer in rule["from"]):
            return True
    return False


def pod(labels: dict[str, str], namespace: str = NAMESPACE) -> dict[str, Any]:
    return {"labels": labels, "namespace": namespace,
            "namespace_labels": {"kubernetes.io/metadata.name": namespace}}


def job_pods(job: api.RLHFJob, namespace: str = NAMESPACE) -> dict[str, dict[str, Any]]:
    """The pods KubeRay would create for the job, by role, with the labels of their templates."""
    rayjob = builders.build_rayjob(job, namespace)
    cluster = rayjob["spec"]["rayClusterSpec"]
    templates = {"head": cluster["headGroupSpec"]["template"],
                 "submitter": rayjob["spec"]["submitterPodTemplate"],
                 **{g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]}}
    return {role: pod(t["metadata"]["labels"], namespace) for role, t in templates.items()}


@pytest.fixture(scope="module")
def job() -> api.RLHFJob:
    return load("llama3-8b-ppo-rm", uid=UID)


OPERATOR_NAMESPACE, KUBERAY_NAMESPACE = "kuberlhf-system", "ray-system"
PEERS = netpol.Peers(OPERATOR_NAMESPACE, KUBERAY_NAMESPACE)


@pytest.fixture(scope="module")
def policy(job: api.RLHFJob) -> dict[str, Any]:
    """The policy of an operator installed in its own namespace, apart from the jobs."""
    return netpol.build_network_policy(job, NAMESPACE, PEERS)


@pytest.mark.parametrize("version", builtin_versions())
def test_policy_validates_strictly_for_every_supported_kubernetes(policy: dict[str, Any],
                                                                  version: str) -> None:
    assert validate_builtin(policy, version) == []


def test_policy_is_owned_by_the_job_labelled_and_applied_before_the_rayjob(job: api.RLHFJob,
                                                                           policy: dict[str, Any]) -> None:
    meta = policy["metadata"]
    assert meta["name"] == builders.child_names(job).network_policy == "llama3-8b-ppo-ingress"
    assert meta["ownerReferences"] == [builders.owner_reference(job)]
    assert meta["labels"]["kuberlhf.io/job"] == job.metadata.name
    kinds = [o["kind"] for o in builders.build_all(job, NAMESPACE)]
    assert kinds.index("NetworkPolicy") == kinds.index("RayJob") - 1
    assert builders.build_all(job, NAMESPACE, PEERS)[kinds.index("NetworkPolicy")] == policy


def test_policy_selects_every_pod_of_the_job_and_no_other(job: api.RLHFJob, policy: dict[str, Any]) -> None:
    selector = policy["spec"]["podSelector"]
    mine = job_pods(job)
    assert set(mine) == {"head", "submitter", "rollout", "actor", "critic", "reward"}
    assert all(matches(selector, p["labels"]) for p in mine.values())
    other = load("tiny-ppo")
    assert not any(matches(selector, p["labels"]) for p in job_pods(other).values())
    assert not matches(selector, {"app.kubernetes.io/name": "kuberlhf", "kuberlhf.io/operator": "true"})


def test_only_ingress_is_restricted_and_every_rule_names_its_sources(policy: dict[str, Any]) -> None:
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    for rule in spec["ingress"]:
        assert rule["from"], "a rule without 'from' admits every source"
        for peer in rule["from"]:
            assert peer.get("podSelector", {}).get("matchLabels"), f"{peer} would admit every pod"
            if "namespaceSelector" in peer:  # pinned by the one namespace label users cannot set
                assert set(peer["namespaceSelector"]) == {"matchLabels"}, peer
                assert list(peer["namespaceSelector"]["matchLabels"]) == ["kubernetes.io/metadata.name"]


@pytest.mark.parametrize("port", [GCS, CLIENT, DASHBOARD, REWARD_SERVER, OBJECT_MANAGER])
def test_the_jobs_own_pods_reach_each_other_on_every_port(job: api.RLHFJob, policy: dict[str, Any],
                                                          port: int) -> None:
    pods = job_pods(job)
    for source in pods.values():
        assert admits(policy, source, port)


OPERATOR = {"app.kubernetes.io/name": "kuberlhf", "kuberlhf.io/operator": "true"}
KUBERAY = {"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/instance": "kuberay"}


@pytest.mark.parametrize(("who", "source", "allowed_ports"), [
    ("the kuberlhf operator in its namespace", pod(OPERATOR, OPERATOR_NAMESPACE), {DASHBOARD}),
    ("the KubeRay operator in its namespace", pod(KUBERAY, KUBERAY_NAMESPACE), {DASHBOARD}),
    ("a kuberlhf-operator label in another namespace", pod(OPERATOR, "intruder"), set()),
    ("a kuberlhf-operator label in the job's namespace", pod(OPERATOR), set()),
    ("a kuberay-operator label in another namespace", pod(KUBERAY, "intruder"), set()),
    ("a kuberay-operator label in the job's namespace", pod(KUBERAY), set()),
    ("a kuberay-operator label in the kuberlhf operator's namespace", pod(KUBERAY, OPERATOR_NAMESPACE),
     set()),
    ("the job's label forged in another namespace",
     pod({"kuberlhf.io/job": "llama3-8b-ppo"}, "intruder"), set()),
    ("another job's head in the same namespace",
     pod({"kuberlhf.io/job": "tiny-ppo", "kuberlhf.io/role": "head"}), set()),
    ("an unlabelled pod in the same namespace", pod({}), set()),
    ("a notebook in another namespace", pod({"app": "jupyter"}, "users"), set()),
])
def test_outsiders_reach_only_the_documented_dashboard_port(
    policy: dict[str, Any], who: str, source: dict[str, Any], allowed_ports: set[int]
) -> None:
    for port in (GCS, CLIENT, DASHBOARD, REWARD_SERVER, OBJECT_MANAGER):
        assert admits(policy, source, port) == (port in allowed_ports), f"{who} -> port {port}"


def test_by_default_the_operator_is_expected_in_the_jobs_namespace_and_kuberay_in_ray_system(
        job: api.RLHFJob) -> None:
    """The chart's default install puts the operator beside its jobs; KubeRay's kustomize install
    uses ray-system. Both stay pinned: the other namespace's look-alikes get nothing."""
    policy = netpol.build_network_policy(job, NAMESPACE)
    assert admits(policy, pod(OPERATOR), DASHBOARD)
    assert admits(policy, pod(KUBERAY, "ray-system"), DASHBOARD)
    assert not admits(policy, pod(OPERATOR, OPERATOR_NAMESPACE), DASHBOARD)
    assert not admits(policy, pod(KUBERAY, "intruder"), DASHBOARD)
    assert [o for o in builders.build_all(job, NAMESPACE) if o["kind"] == "NetworkPolicy"] == [policy]


def test_kuberays_alpha_network_policy_knob_stays_unset(job: api.RLHFJob) -> None:
    """KubeRay v1.7.0 refuses spec.networkPolicy unless its alpha feature gate is on (off by
    default), so setting it would fail every job on a default install; netpol.py says why."""
    rayjob = builders.build_rayjob(job, NAMESPACE)
    assert "networkPolicy" not in rayjob["spec"]["rayClusterSpec"]
    assert validate_kuberay(rayjob) == []


def test_the_operator_may_manage_every_kind_it_builds(job: api.RLHFJob) -> None:
    """The chart's RBAC file must grant the operator what applying build_all's objects takes."""
    rules = yaml.safe_load((ROOT / "charts" / "kuberlhf" / "files" / "operator-rbac.yaml").read_text())
    granted = {(group, resource): set(rule["verbs"]) for rule in rules["namespaced"]
               for group in rule["apiGroups"] for resource in rule["resources"]}
    plural = {"NetworkPolicy": "networkpolicies", "ConfigMap": "configmaps", "RayJob": "rayjobs",
              "ServiceAccount": "serviceaccounts", "Role": "roles", "RoleBinding": "rolebindings",
              "PersistentVolumeClaim": "persistentvolumeclaims",
              "PodDisruptionBudget": "poddisruptionbudgets"}
    for obj in builders.build_all(job, NAMESPACE):
        group = obj["apiVersion"].rpartition("/")[0]
        assert {"get", "create", "patch"} <= granted.get((group, plural[obj["kind"]]), set()), obj["kind"]
