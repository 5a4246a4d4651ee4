"""What the API emulator adds to kmock, checked over HTTP as kopf and kubectl use it."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import pytest

from kuberlhf import crd
from tests.emulator import EmulatorHandle, running_emulator
from tests.emulator.objects import PatchError, json_patch, label_selector_matches, merge_patch

pytestmark = pytest.mark.unit

CMS = "/api/v1/namespaces/default/configmaps"
JOBS = "/apis/kuberlhf.io/v1alpha1/namespaces/default/rlhfjobs"
MERGE = "application/merge-patch+json"


def call(handle: EmulatorHandle, method: str, path: str, body: Any = None,
         content_type: str = "application/json", token: str | None = None,
         accept: str = "application/json") -> tuple[int, Any]:
    token = token or handle.emulator.admin_token
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(handle.url + path, data=data, method=method, headers={
        "Authorization": f"Bearer {token}", "Content-Type": content_type, "Accept": accept})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def configmap(name: str, **meta: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, **meta}, "data": {"k": "v"}}


def job(name: str = "j") -> dict[str, Any]:
    return {"apiVersion": "kuberlhf.io/v1alpha1", "kind": "RLHFJob", "metadata": {"name": name},
            "spec": {"algorithm": "grpo", "schedule": {"steps": 5}}}


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[EmulatorHandle]:
    with running_emulator(tmp_path, authorize=True) as handle:
        assert call(handle, "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
                    crd.build_crd())[0] == 201
        yield handle


def test_create_assigns_identity_and_refuses_duplicates(emulator: EmulatorHandle) -> None:
    code, obj = call(emulator, "POST", CMS, configmap("a"))
    assert code == 201
    meta = obj["metadata"]
    assert meta["uid"] and meta["resourceVersion"].isdigit() and meta["generation"] == 1
    assert meta["creationTimestamp"].endswith("Z") and meta["namespace"] == "default"
    code, error = call(emulator, "POST", CMS, configmap("a"))
    assert (code, error["reason"]) == (409, "AlreadyExists")
    code, generated = call(emulator, "POST", CMS, configmap("", generateName="gen-"))
    generated_name = generated["metadata"]["name"]
    assert code == 201 and generated_name.startswith("gen-") and len(generated_name) > 4
    assert call(emulator, "POST", "/api/v1/namespaces/nowhere/configmaps", configmap("x"))[0] == 404


def test_generation_and_status_subresource_are_separate(emulator: EmulatorHandle) -> None:
    created = call(emulator, "POST", JOBS, {**job(), "status": {"phase": "Hacked"}})[1]
    assert "status" not in created
    both = {"status": {"phase": "Running"}, "spec": {"x": 1}}
    _, patched = call(emulator, "PATCH", f"{JOBS}/j/status", both, MERGE)
    assert patched["status"] == {"phase": "Running"} and "x" not in patched["spec"]
    assert patched["metadata"]["generation"] == 1
    _, patched = call(emulator, "PATCH", f"{JOBS}/j", {"metadata": {"labels": {"a": "b"}}}, MERGE)
    assert patched["metadata"]["generation"] == 1
    spec_and_status = {"spec": {"schedule": {"steps": 9}}, "status": None}
    _, patched = call(emulator, "PATCH", f"{JOBS}/j", spec_and_status, MERGE)
    assert patched["metadata"]["generation"] == 2 and patched["status"] == {"phase": "Running"}
    same_rv = patched["metadata"]["resourceVersion"]
    _, unchanged = call(emulator, "PATCH", f"{JOBS}/j", {"spec": {"schedule": {"steps": 9}}}, MERGE)
    assert unchanged["metadata"]["resourceVersion"] == same_rv


def test_stale_resource_version_conflicts_on_put_and_patch(emulator: EmulatorHandle) -> None:
    obj = call(emulator, "POST", CMS, configmap("a"))[1]
    stale = obj["metadata"]["resourceVersion"]
    code, replaced = call(emulator, "PUT", f"{CMS}/a", {**obj, "data": {"k": "w"}})
    assert code == 200 and replaced["data"] == {"k": "w"}
    assert call(emulator, "PUT", f"{CMS}/a", {**obj, "data": {"k": "z"}})[0] == 409
    guarded = {"metadata": {"resourceVersion": stale}, "data": {}}
    code, error = call(emulator, "PATCH", f"{CMS}/a", guarded, MERGE)
    assert (code, error["reason"]) == (409, "Conflict")


def test_json_patch_applies_and_a_failed_test_is_422(emulator: EmulatorHandle) -> None:
    call(emulator, "POST", CMS, configmap("a"))
    ops = [{"op": "test", "path": "/data/k", "value": "v"}, {"op": "add", "path": "/data/n", "value": "1"}]
    code, obj = call(emulator, "PATCH", f"{CMS}/a", ops, "application/json-patch+json")
    assert code == 200 and obj["data"] == {"k": "v", "n": "1"}
    ops[0]["value"] = "something else"
    code, error = call(emulator, "PATCH", f"{CMS}/a", ops, "application/json-patch+json")
    assert code == 422 and "test operation failed" in error["message"]


def test_patch_helpers_follow_the_rfcs() -> None:
    assert merge_patch({"a": {"b": 1, "c": 2}}, {"a": {"b": None, "d": 3}}) == {"a": {"c": 2, "d": 3}}
    assert json_patch({"l": [1, 3]}, [{"op": "add", "path": "/l/1", "value": 2}]) == {"l": [1, 2, 3]}
    with pytest.raises(PatchError):
        json_patch({}, [{"op": "remove", "path": "/missing"}])


@pytest.mark.parametrize(("selector", "matches"), [
    ("app=x", True), ("app==x", True), ("app!=x", False), ("app in (x,y)", True),
    ("app notin (x, y)", False), ("tier", True), ("!tier", False), ("!absent,app=x", True), ("app=y", False),
])
def test_label_selector_grammar(selector: str, matches: bool) -> None:
    assert label_selector_matches(selector, {"app": "x", "tier": "db"}) is matches


def test_list_filters_by_label_and_field_selectors(emulator: EmulatorHandle) -> None:
    call(emulator, "POST", CMS, configmap("a", labels={"app": "x"}))
    call(emulator, "POST", CMS, configmap("b", labels={"app": "y"}))
    names = lambda q: [o["metadata"]["name"] for o in call(emulator, "GET", f"{CMS}?{q}")[1]["items"]]  # noqa: E731
    assert names("labelSelector=app%3Dx") == ["a"]
    assert names("labelSelector=app%20in%20(x,y)") == ["a", "b"]
    assert names("fieldSelector=metadata.name%3Db") == ["b"]


def watch_lines(handle: EmulatorHandle, query: str, count: int) -> tuple[str, list[dict[str, Any]]]:
    request = urllib.request.Request(f"{handle.url}{CMS}?watch=true&timeoutSeconds=2&{query}",
                                     headers={"Authorization": f"Bearer {handle.emulator.admin_token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        lines = [json.loads(line) for _, line in zip(range(count), response, strict=False)]
        return response.headers["Content-Type"], lines


def test_watch_resumes_from_a_resource_version_without_losing_writes(emulator: EmulatorHandle) -> None:
    first = call(emulator, "POST", CMS, configmap("a"))[1]["metadata"]["resourceVersion"]
    call(emulator, "PATCH", f"{CMS}/a", {"data": {"k": "2"}}, MERGE)
    call(emulator, "POST", CMS, configmap("b"))
    call(emulator, "DELETE", f"{CMS}/a")
    content_type, events = watch_lines(emulator, f"resourceVersion={first}", 3)
    assert content_type.startswith("application/json")
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("MODIFIED", "a"), ("ADDED", "b"), ("DELETED", "a")]
    versions = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert versions == sorted(versions) and versions[0] > int(first)
    _, initial = watch_lines(emulator, "", 1)
    assert initial[0]["type"] == "ADDED" and initial[0]["object"]["metadata"]["name"] == "b"


def test_watch_from_a_compacted_version_gets_410_gone(emulator: EmulatorHandle) -> None:
    old = call(emulator, "POST", CMS, configmap("a"))[1]["metadata"]["resourceVersion"]
    for i in range(3):
        call(emulator, "POST", CMS, configmap(f"n{i}"))
    emulator.call(lambda: emulator.emulator.compact(len(emulator.emulator.changes) - 1))
    _, events = watch_lines(emulator, f"resourceVersion={old}", 1)
    assert events[0]["type"] == "ERROR" and events[0]["object"]["code"] == 410


def test_deleting_an_owner_collects_its_dependents_unless_orphaned(emulator: EmulatorHandle) -> None:
    owner = call(emulator, "POST", JOBS, job("owner"))[1]
    ref = {"apiVersion": "kuberlhf.io/v1alpha1", "kind": "RLHFJob", "name": "owner",
           "uid": owner["metadata"]["uid"], "controller": True}
    child = call(emulator, "POST", CMS, configmap("child", ownerReferences=[ref]))[1]
    grandchild_ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "child",
                      "uid": child["metadata"]["uid"]}
    call(emulator, "POST", CMS, configmap("grandchild", ownerReferences=[grandchild_ref]))
    call(emulator, "POST", CMS, configmap("bystander"))
    assert call(emulator, "DELETE", f"{JOBS}/owner")[0] == 200
    assert [o["metadata"]["name"] for o in emulator.list("", "configmaps")] == ["bystander"]

    kept_owner = call(emulator, "POST", JOBS, job("kept"))[1]
    ref["uid"], ref["name"] = kept_owner["metadata"]["uid"], "kept"
    call(emulator, "POST", CMS, configmap("orphan", ownerReferences=[ref]))
    call(emulator, "DELETE", f"{JOBS}/kept", {"propagationPolicy": "Orphan"})
    orphan = emulator.get("", "configmaps", "default", "orphan")
    assert orphan is not None and orphan["metadata"]["ownerReferences"] == []


def test_finalizers_hold_deletion_until_removed(emulator: EmulatorHandle) -> None:
    call(emulator, "POST", CMS, configmap("a", finalizers=["example.com/hold"]))
    code, marked = call(emulator, "DELETE", f"{CMS}/a")
    assert code == 200 and marked["metadata"]["deletionTimestamp"]
    assert emulator.get("", "configmaps", "default", "a") is not None
    call(emulator, "PATCH", f"{CMS}/a", {"metadata": {"finalizers": None}}, MERGE)
    assert emulator.get("", "configmaps", "default", "a") is None


def test_table_rendering_uses_the_crd_printer_columns(emulator: EmulatorHandle) -> None:
    call(emulator, "POST", JOBS, job())
    status = {"status": {"phase": "Running", "progress": {"step": 3, "totalSteps": 5}}}
    call(emulator, "PATCH", f"{JOBS}/j/status", status, MERGE)
    code, table = call(emulator, "GET", JOBS, accept="application/json;as=Table;v=v1;g=meta.k8s.io")
    assert code == 200 and table["kind"] == "Table"
    names = [c["name"] for c in table["columnDefinitions"]]
    assert names[:6] == ["Name", "Phase", "Algorithm", "Step", "Total", "Reward"] and names[-1] == "Age"
    assert table["rows"][0]["cells"][:5] == ["j", "Running", "grpo", 3, 5]
    assert table["rows"][0]["cells"][-1].endswith("s")


def test_discovery_follows_applied_and_deleted_crds(emulator: EmulatorHandle) -> None:
    groups = [g["name"] for g in call(emulator, "GET", "/apis")[1]["groups"]]
    assert "kuberlhf.io" in groups
    resources = call(emulator, "GET", "/apis/kuberlhf.io/v1alpha1")[1]["resources"]
    assert {r["name"] for r in resources} == {"rlhfjobs", "rlhfjobs/status"}
    assert call(emulator, "GET", "/api/v1/namespaces")[1]["items"][0]["metadata"]["name"] == "default"
    assert call(emulator, "GET", "/openapi/v3")[0] == 200
    call(emulator, "POST", JOBS, job())
    crd_path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/rlhfjobs.kuberlhf.io"
    assert call(emulator, "DELETE", crd_path)[0] == 200
    assert call(emulator, "GET", "/apis/kuberlhf.io/v1alpha1")[0] == 404
    assert call(emulator, "GET", JOBS)[0] == 404


def test_rbac_grants_only_what_roles_bind(emulator: EmulatorHandle) -> None:
    user = "system:serviceaccount:default:driver"
    token = emulator.add_token(user)
    call(emulator, "POST", JOBS, job("mine"))
    call(emulator, "POST", JOBS, job("other"))
    assert call(emulator, "GET", f"{JOBS}/mine", token=token)[0] == 403
    rbac = "rbac.authorization.k8s.io"
    rule = {"apiGroups": ["kuberlhf.io"], "resources": ["rlhfjobs/status"], "verbs": ["get", "patch"],
            "resourceNames": ["mine"]}
    role = {"apiVersion": f"{rbac}/v1", "kind": "Role", "metadata": {"name": "driver"}, "rules": [rule]}
    binding = {"apiVersion": f"{rbac}/v1", "kind": "RoleBinding", "metadata": {"name": "driver"},
               "roleRef": {"apiGroup": rbac, "kind": "Role", "name": "driver"},
               "subjects": [{"kind": "ServiceAccount", "name": "driver", "namespace": "default"}]}
    call(emulator, "POST", "/apis/rbac.authorization.k8s.io/v1/namespaces/default/roles", role)
    call(emulator, "POST", "/apis/rbac.authorization.k8s.io/v1/namespaces/default/rolebindings", binding)
    status = {"status": {"phase": "Running"}}
    assert call(emulator, "PATCH", f"{JOBS}/mine/status", status, MERGE, token=token)[0] == 200
    code, error = call(emulator, "PATCH", f"{JOBS}/other/status", status, MERGE, token=token)
    assert code == 403 and user in error["message"]
    assert call(emulator, "PATCH", f"{JOBS}/mine", {"spec": {}}, MERGE, token=token)[0] == 403
    assert call(emulator, "GET", JOBS, token=token)[0] == 403
    assert call(emulator, "GET", JOBS, token="wrong")[0] == 401
    logged = [(r.verb, r.name, r.subresource, r.status) for r in emulator.requests(user)]
    assert ("patch", "mine", "status", 200) in logged and ("patch", "other", "status", 403) in logged


def test_owner_reference_enforcement_guards_block_owner_deletion_and_adoption(
        emulator: EmulatorHandle) -> None:
    """OwnerReferencesPermissionEnforcement, as kube-apiserver's gc admission plugin decides."""
    emulator.call(lambda: setattr(emulator.emulator, "enforce_owner_references", True))
    user = "system:serviceaccount:default:maker"
    token = emulator.add_token(user)
    owner = call(emulator, "POST", JOBS, job("owner"))[1]
    ref = {"apiVersion": "kuberlhf.io/v1alpha1", "kind": "RLHFJob", "name": "owner",
           "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
    rbac = "rbac.authorization.k8s.io"
    rules = [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create", "patch"]}]
    role = {"apiVersion": f"{rbac}/v1", "kind": "Role", "metadata": {"name": "maker"}, "rules": rules}
    binding = {"apiVersion": f"{rbac}/v1", "kind": "RoleBinding", "metadata": {"name": "maker"},
               "roleRef": {"apiGroup": rbac, "kind": "Role", "name": "maker"},
               "subjects": [{"kind": "ServiceAccount", "name": "maker", "namespace": "default"}]}
    roles = f"/apis/{rbac}/v1/namespaces/default/roles"
    call(emulator, "POST", roles, role)
    call(emulator, "POST", f"/apis/{rbac}/v1/namespaces/default/rolebindings", binding)

    assert call(emulator, "POST", CMS, configmap("plain"), token=token)[0] == 201
    code, error = call(emulator, "POST", CMS, configmap("child", ownerReferences=[ref]), token=token)
    assert code == 403, error
    assert "cannot set blockOwnerDeletion" in error["message"] and '"rlhfjobs/finalizers"' in error["message"]
    non_blocking = {**ref, "blockOwnerDeletion": False}
    weak = configmap("weak", ownerReferences=[non_blocking])
    assert call(emulator, "POST", CMS, weak, token=token)[0] == 201

    rules.append({"apiGroups": ["kuberlhf.io"], "resources": ["rlhfjobs/finalizers"], "verbs": ["update"]})
    call(emulator, "PATCH", f"{roles}/maker", {"rules": rules}, MERGE)
    assert call(emulator, "POST", CMS, configmap("child", ownerReferences=[ref]), token=token)[0] == 201
    # Adopting an existing object changes its references: that takes `delete` on it as well.
    code, error = call(emulator, "PATCH", f"{CMS}/plain", {"metadata": {"ownerReferences": [ref]}}, MERGE,
                       token=token)
    assert code == 403 and "cannot set an ownerRef on a resource you can't delete" in error["message"]
    assert call(emulator, "PATCH", f"{CMS}/child", {"data": {"k": "w"}}, MERGE, token=token)[0] == 200


def test_canary_plain_kmock_still_lacks_what_the_subclass_adds() -> None:
    """If kmock (pinned 0.8) starts doing these itself, revisit tests/emulator/server.py."""
    url = "/api/v1/namespaces/default/configmaps"
    assert kmock.__version__.startswith("0.8")

    async def scenario() -> tuple[int, dict[str, Any]]:
        async with kmock.KubernetesEmulator() as plain, kmock.Server(plain) as server, \
                aiohttp.ClientSession() as session, \
                session.post(f"{server.url}{url}".replace("//api", "/api"), json=configmap("a")) as response:
            return response.status, await response.json()

    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(out=asyncio.run(scenario())))
    thread.start()
    thread.join(timeout=20)
    status, body = result["out"]
    assert status == 200, "plain kmock now answers 201 on create"
    assert "resourceVersion" not in body["metadata"] and "uid" not in body["metadata"]


def test_server_side_apply_creates_then_merges_and_protobuf_is_refused(emulator: EmulatorHandle) -> None:
    apply = "application/apply-patch+yaml"
    code, created = call(emulator, "PATCH", f"{CMS}/ssa?fieldManager=helm", configmap("ssa"), apply)
    assert code == 201 and created["data"] == {"k": "v"}
    update = {**configmap("ssa"), "data": {"n": "1"}}
    code, merged = call(emulator, "PATCH", f"{CMS}/ssa?fieldManager=helm", update, apply)
    assert code == 200 and merged["data"] == {"k": "v", "n": "1"}
    code, error = call(emulator, "POST", CMS, configmap("p"), "application/vnd.kubernetes.protobuf")
    assert code == 415 and "JSON only" in error["message"]
