"""Least privilege, proved from the wire: every API call the operator and the driver make during a
job's whole life is allowed by the RBAC we ship, and every permission we ship is either used in
that life or listed below with the reason it is needed elsewhere.

The operator is bound to the chart's own permission file (charts/kuberlhf/files/operator-rbac.yaml,
cluster-wide mode) and the driver to the Role the operator creates for it; the emulator enforces
RBAC and logs each request, which is mapped to (apiGroup, resource[/subresource], verb).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes
import pytest
import yaml

from kuberlhf.api import parse_job
from kuberlhf_operator.builders import build_all, build_driver_rbac
from kuberlhf_operator.kubeapi import ApiError, KubeApi
from kuberlhf_workers.control.status_reporter import StatusReporter
from tests.emulator import EmulatorHandle, LoggedRequest
from tests.emulator.resources import parse_api_path
from tests.operator.conftest import OPERATOR_USER, running_operator, running_standin, wait_for
from tests.operator.test_handlers import JOBS, job_status, tiny_job

RBAC_FILE = Path(__file__).resolve().parents[2] / "charts" / "kuberlhf" / "files" / "operator-rbac.yaml"
RB = "rbac.authorization.k8s.io"
DRIVER_USER = "system:serviceaccount:default:tiny-driver"
Grant = tuple[str, str, str]  # (apiGroup, resource[/subresource], verb)
# Granted but used by no request, each with the reason it is needed anyway.
JUSTIFIED: dict[Grant, str] = {
    ("kuberlhf.io", "rlhfjobs/finalizers", "update"):
        "every child's ownerReference sets blockOwnerDeletion, which the "
        "OwnerReferencesPermissionEnforcement admission plugin (OpenShift) refuses without it; "
        "test_children_with_block_owner_deletion_need_update_on_rlhfjobs_finalizers proves it",
}


def flatten(rules: list[dict[str, Any]]) -> set[Grant]:
    return {(group, resource, verb) for rule in rules for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def chart_grants() -> set[Grant]:
    """Cluster-wide mode: the operator's ClusterRole holds all three sections."""
    sections = yaml.safe_load(RBAC_FILE.read_text())
    return flatten([rule for name in ("namespaced", "cluster", "clusterWide") for rule in sections[name]])


def driver_role_grants() -> set[Grant]:
    role = next(o for o in build_driver_rbac(parse_job(tiny_job()), "default") if o["kind"] == "Role")
    return flatten(role["rules"])


def grant_of(request: LoggedRequest) -> Grant | None:
    where = parse_api_path(request.path)
    if where is None or where.plural is None:
        return None  # discovery (/api, /apis/...): non-resource URLs every authenticated user may read
    resource = where.plural + (f"/{where.subresource}" if where.subresource else "")
    return where.group, resource, request.verb or ""


def bind_operator_to_the_chart(handle: EmulatorHandle, admin: KubeApi,
                               leave_out: Grant | None = None) -> None:
    sections = yaml.safe_load(RBAC_FILE.read_text())
    rules = sections["namespaced"] + sections["cluster"] + sections["clusterWide"]
    if leave_out is not None:
        rules = [rule for rule in rules if leave_out not in flatten([rule])]
    admin.request("POST", f"/apis/{RB}/v1/clusterroles", {
        "apiVersion": f"{RB}/v1", "kind": "ClusterRole", "metadata": {"name": "kuberlhf"}, "rules": rules})
    admin.request("POST", f"/apis/{RB}/v1/clusterrolebindings", {
        "apiVersion": f"{RB}/v1", "kind": "ClusterRoleBinding", "metadata": {"name": "kuberlhf"},
        "roleRef": {"apiGroup": RB, "kind": "ClusterRole", "name": "kuberlhf"},
        "subjects": [{"kind": "ServiceAccount", "name": "kuberlhf-operator",
                      "namespace": "kuberlhf-system"}]})


def driver_api(handle: EmulatorHandle) -> tuple[KubeApi, Any]:
    path = handle.service_account_kubeconfig("default", "tiny-driver")
    client = kubernetes.config.new_client_from_config(config_file=str(path))  # type: ignore[no-untyped-call]
    return KubeApi(client), client


def test_every_call_is_granted_and_every_grant_is_used_or_justified(
        secured_cluster: EmulatorHandle, admin: KubeApi) -> None:
    handle = secured_cluster
    bind_operator_to_the_chart(handle, admin)
    for child in build_all(parse_job(tiny_job()), "default"):  # made by hand: the operator adopts them
        if child["kind"] != "RayJob":
            child["metadata"].pop("ownerReferences", None)
            handle.create(child, "default")
    with running_operator(handle), running_standin(handle):
        admin.create(tiny_job())
        wait_for(lambda: job_status(handle).get("phase") in ("Running", "Succeeded"), what="launched")
        _, client = driver_api(handle)
        reporter = StatusReporter("tiny", "default", api_client=client, min_interval_s=0.0)
        reporter.report(3, 20, {"reward_mean": 0.25}, None)
        reporter.close()
        assert reporter.sent == 1 and reporter.failures == 0
        wait_for(lambda: job_status(handle).get("phase") == "Succeeded", what="phase Succeeded")
        admin.merge_patch(f"{JOBS}/tiny", {"spec": {"suspend": True}})  # a mutable knob after the end
        admin.merge_patch(f"{JOBS}/tiny", {"spec": {"seed": 99}})       # a refused frozen-field edit
        wait_for(lambda: any(c.get("reason") == "ImmutableFieldChanged"
                             for c in job_status(handle).get("conditions", [])), what="refusal")
        admin.request("DELETE", f"{JOBS}/tiny")
        wait_for(lambda: not handle.list("ray.io", "rayjobs"), what="children collected")

    operator_calls = handle.requests(OPERATOR_USER)
    driver_calls = handle.requests(DRIVER_USER)
    assert operator_calls and driver_calls
    assert [(r.method, r.path) for r in operator_calls + driver_calls if r.status in (401, 403)] == []

    granted = chart_grants()
    used = {g for g in map(grant_of, operator_calls) if g is not None}
    assert used <= granted, f"calls the chart does not allow: {sorted(used - granted)}"
    unused = granted - used
    assert sorted(unused - set(JUSTIFIED)) == [], \
        "granted by the chart but never used: remove it from operator-rbac.yaml"
    assert unused == set(JUSTIFIED), "a justified grant is now used by a request: drop it from JUSTIFIED"

    driver_granted = driver_role_grants()
    driver_used = {g for g in map(grant_of, driver_calls) if g is not None}
    assert driver_used == {("kuberlhf.io", "rlhfjobs/status", "patch")}
    assert driver_used <= driver_granted
    assert driver_granted == driver_used, "the driver Role grants more than the driver uses"
    print(f"\nleast privilege: {len(operator_calls)} operator calls use {len(used)} of {len(granted)} "
          f"granted (group, resource, verb); driver: {len(driver_calls)} calls use "
          f"{sorted(driver_used)}")


def test_the_driver_can_patch_only_its_own_jobs_status(secured_cluster: EmulatorHandle,
                                                       admin: KubeApi) -> None:
    handle = secured_cluster
    bind_operator_to_the_chart(handle, admin)
    with running_operator(handle):
        admin.create(tiny_job())
        admin.create(tiny_job("other"))
        wait_for(lambda: handle.get(RB, "rolebindings", "default", "tiny-driver"), what="driver RoleBinding")
    role = handle.get(RB, "roles", "default", "tiny-driver")
    assert role is not None and all(rule.get("resourceNames") == ["tiny"] for rule in role["rules"])
    driver, _ = driver_api(handle)
    progress = {"status": {"progress": {"step": 1, "totalSteps": 2}}}

    driver.merge_patch(f"{JOBS}/tiny/status", progress)
    denied = [
        ("GET", f"{JOBS}/tiny", None),                           # even reading itself: it never needs to
        ("PATCH", f"{JOBS}/other/status", progress),             # another job's status
        ("PATCH", f"{JOBS}/tiny", {"spec": {"suspend": True}}),  # its own spec
        ("GET", f"{JOBS}/other", None),                          # reading another job
        ("GET", JOBS, None),                                     # listing jobs
        ("DELETE", f"{JOBS}/tiny", None),                        # deleting itself
        ("GET", "/api/v1/namespaces/default/secrets", None),     # secrets, of course
        ("POST", "/apis/ray.io/v1/namespaces/default/rayjobs", {"apiVersion": "ray.io/v1", "kind": "RayJob",
                                                                 "metadata": {"name": "x"}}),
    ]
    for method, path, body in denied:
        with pytest.raises(ApiError) as refused:
            driver.request(method, path, body, "application/merge-patch+json" if method == "PATCH"
                           else "application/json")
        assert refused.value.status == 403, (method, path, refused.value)
    assert (handle.get("kuberlhf.io", "rlhfjobs", "default", "other") or {}).get("status", {}).get(
        "progress") is None
    assert (handle.get("kuberlhf.io", "rlhfjobs", "default", "tiny") or {})["spec"].get("suspend") is not True


@pytest.mark.parametrize("finalizers_granted", [True, False])
def test_children_with_block_owner_deletion_need_update_on_rlhfjobs_finalizers(
        secured_cluster: EmulatorHandle, admin: KubeApi, finalizers_granted: bool) -> None:
    """Where OwnerReferencesPermissionEnforcement runs (OpenShift), the chart's RBAC launches a job with
    no refusal; without `update` on rlhfjobs/finalizers every child the operator creates is refused."""
    handle = secured_cluster
    handle.call(lambda: setattr(handle.emulator, "enforce_owner_references", True))
    finalizers = ("kuberlhf.io", "rlhfjobs/finalizers", "update")
    bind_operator_to_the_chart(handle, admin, leave_out=None if finalizers_granted else finalizers)
    with running_operator(handle), running_standin(handle):
        admin.create(tiny_job())
        if finalizers_granted:
            wait_for(lambda: job_status(handle).get("phase") in ("Running", "Succeeded"), what="launched")
        else:
            wait_for(lambda: any(r.method == "POST" and r.status == 403
                                 for r in handle.requests(OPERATOR_USER)), what="a refused create")
    creates = [r for r in handle.requests(OPERATOR_USER) if r.method == "POST" and r.resource != "events"]
    assert creates
    refused = [r.resource for r in creates if r.status == 403]
    if finalizers_granted:
        assert refused == []
        assert handle.get("ray.io", "rayjobs", "default", "tiny-ray") is not None
    else:
        assert refused and set(refused) == {r.resource for r in creates}, "every owned child is refused"
        assert handle.list("ray.io", "rayjobs") == []


def test_the_charts_default_namespaced_install_runs_a_job_with_rights_in_that_namespace_only(
        secured_cluster: EmulatorHandle, admin: KubeApi) -> None:
    """The chart's default mode, end to end: its Role and RoleBinding (rendered by Helm for the jobs'
    namespace) and the operator watching that namespace, as the Deployment's --namespace says. The
    job runs with no refusal, and no call of the operator reaches outside the namespace: it needs no
    cluster-scoped right, not even to read the RLHFJob CRD."""
    handle = secured_cluster
    chart_dir = RBAC_FILE.parents[1]
    release, operator_namespace = OPERATOR_USER.split(":")[3], OPERATOR_USER.split(":")[2]
    with helm.Chart.load(chart_dir) as chart:
        manifests = chart.render({"watchNamespaces": ["default"]}, name=release, namespace=operator_namespace,
                                 is_install=True)
    documents = [doc for path, text in manifests.items() if path.endswith(".yaml")
                 for doc in yaml.safe_load_all(text) if doc]
    rbac = [doc for doc in documents if "Role" in doc["kind"]]
    assert sorted(doc["kind"] for doc in rbac) == ["Role", "RoleBinding"]
    for doc in rbac:
        plural = "roles" if doc["kind"] == "Role" else "rolebindings"
        admin.request("POST", f"/apis/{RB}/v1/namespaces/default/{plural}", doc)
    [deployment] = [doc for doc in documents if doc["kind"] == "Deployment"]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    watched = [arg.removeprefix("--namespace=") for arg in args if arg.startswith("--namespace=")]
    assert watched == ["default"]
    with running_operator(handle, namespaces=watched), running_standin(handle):
        admin.create(tiny_job())
        wait_for(lambda: job_status(handle).get("phase") == "Succeeded", what="phase Succeeded")
    calls = handle.requests(OPERATOR_USER)
    assert [(r.method, r.path, r.status) for r in calls if r.status in (401, 403)] == []
    outside = {(r.method, r.path) for r in calls if grant_of(r) is not None and r.namespace != "default"}
    assert outside == set(), "a namespaced operator reached outside its namespace"
    assert any(r.method == "POST" and r.resource == "rayjobs" and r.status == 201 for r in calls)
