"""The PodDisruptionBudget: a voluntary eviction (a node drain) of any Ray pod of a training job is
refused, since losing one rank fails the whole run; nothing else of the job or of other jobs is held."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kuberlhf import api
from kuberlhf_operator import builders
from tests.kuberay_schema import builtin_versions, validate_builtin

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "team-a"
UID = "6f1c0b1e-2222-4a4a-9c9c-0123456789ab"


def load(name: str, **metadata: Any) -> api.RLHFJob:
    doc = yaml.safe_load((ROOT / "examples" / f"{name}.yaml").read_text())
    doc["metadata"].update(metadata)
    return api.parse_job(doc)


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """LabelSelector semantics for what the budget uses: matchLabels and `In` expressions."""
    assert set(selector) <= {"matchLabels", "matchExpressions"}, selector
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In", f"the evaluator knows In only: {expression}"
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def pod_labels(job: api.RLHFJob) -> dict[str, dict[str, str]]:
    """The labels of each pod template of the job's RayJob, by role."""
    rayjob = builders.build_rayjob(job, NAMESPACE)
    cluster = rayjob["spec"]["rayClusterSpec"]
    templates = {"head": cluster["headGroupSpec"]["template"],
                 "submitter": rayjob["spec"]["submitterPodTemplate"],
                 **{g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]}}
    return {role: t["metadata"]["labels"] for role, t in templates.items()}


@pytest.fixture(scope="module")
def job() -> api.RLHFJob:
    return load("llama3-8b-ppo-rm", uid=UID)


@pytest.fixture(scope="module")
def budget(job: api.RLHFJob) -> dict[str, Any]:
    return builders.build_pod_disruption_budget(job, NAMESPACE)


@pytest.mark.parametrize("version", builtin_versions())
def test_the_budget_validates_strictly_for_every_supported_kubernetes(budget: dict[str, Any],
                                                                      version: str) -> None:
    assert validate_builtin(budget, version) == []


def test_no_ray_pod_of_the_job_may_be_evicted_while_it_is_ready(budget: dict[str, Any]) -> None:
    assert budget["apiVersion"] == "policy/v1"
    spec = budget["spec"]
    assert spec["maxUnavailable"] == 0 and "minAvailable" not in spec
    # A pod that is not Ready protects no training: it must not block a drain forever.
    assert spec["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_the_budget_selects_the_head_and_every_worker_group_but_not_the_submitter(
        job: api.RLHFJob, budget: dict[str, Any]) -> None:
    selector = budget["spec"]["selector"]
    pods = pod_labels(job)
    assert set(pods) == {"head", "submitter", "rollout", "actor", "critic", "reward"}
    held = {role for role, labels in pods.items() if selects(selector, labels)}
    assert held == {"head", "rollout", "actor", "critic", "reward"}


def test_the_budget_follows_the_jobs_topology_and_leaves_other_jobs_alone(budget: dict[str, Any]) -> None:
    tiny = load("tiny-grpo")
    tiny_budget = builders.build_pod_disruption_budget(tiny, NAMESPACE)
    tiny_pods = pod_labels(tiny)
    held = {role for role, labels in tiny_pods.items() if selects(tiny_budget["spec"]["selector"], labels)}
    assert held == set(tiny_pods) - {"submitter"}
    assert not any(selects(budget["spec"]["selector"], labels) for labels in tiny_pods.values())


def test_the_budget_is_owned_by_the_job_and_applied_before_the_rayjob(job: api.RLHFJob,
                                                                      budget: dict[str, Any]) -> None:
    meta = budget["metadata"]
    assert meta["name"] == builders.child_names(job).pod_disruption_budget == "llama3-8b-ppo-ray-pods"
    assert meta["namespace"] == NAMESPACE
    assert meta["ownerReferences"] == [builders.owner_reference(job)]
    kinds = [o["kind"] for o in builders.build_all(job, NAMESPACE)]
    assert kinds.index("PodDisruptionBudget") < kinds.index("RayJob")
