"""Resource types the API emulator serves: built-ins, plus whatever CRDs register.

Discovery documents (/api, /apis, /api/v1, /apis/<group>/<version>, /openapi/v3) and the
parsing of resource paths are here. Discovery documents are rendered from this
registry, so applying a CRD object makes its resource appear to kubectl and kopf exactly as
on a real cluster, with its status subresource and printer columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Obj = dict[str, Any]
ALL_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


@dataclass(frozen=True)
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    short_names: tuple[str, ...] = ()
    status_subresource: bool = False
    columns: tuple[dict[str, Any], ...] | None = None
    categories: tuple[str, ...] = field(default=())

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def singular(self) -> str:
        return self.kind.lower()


BUILTINS = [
    ResourceType("", "v1", "namespaces", "Namespace", namespaced=False, short_names=("ns",),
                 status_subresource=True),
    ResourceType("", "v1", "configmaps", "ConfigMap", short_names=("cm",)),
    ResourceType("", "v1", "secrets", "Secret"),
    ResourceType("", "v1", "serviceaccounts", "ServiceAccount", short_names=("sa",)),
    ResourceType("", "v1", "events", "Event", short_names=("ev",)),
    ResourceType("", "v1", "pods", "Pod", short_names=("po",), status_subresource=True),
    ResourceType("", "v1", "services", "Service", short_names=("svc",), status_subresource=True),
    ResourceType("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", short_names=("pvc",),
                 status_subresource=True),
    ResourceType("events.k8s.io", "v1", "events", "Event", short_names=("ev",)),
    ResourceType("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", short_names=("netpol",)),
    ResourceType("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", short_names=("pdb",),
                 status_subresource=True),
    ResourceType("coordination.k8s.io", "v1", "leases", "Lease"),
    ResourceType("rbac.authorization.k8s.io", "v1", "roles", "Role"),
    ResourceType("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding"),
    ResourceType("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", namespaced=False),
    ResourceType("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding",
                 namespaced=False),
    ResourceType("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition",
                 namespaced=False, short_names=("crd", "crds"), status_subresource=True),
]


def types_from_crd(crd: Obj) -> list[ResourceType]:
    """One ResourceType per served version of a CustomResourceDefinition."""
    spec = crd.get("spec", {})
    names = spec.get("names", {})
    result = []
    for version in spec.get("versions", []):
        if not version.get("served", True):
            continue
        result.append(ResourceType(
            group=spec["group"], version=version["name"], plural=names["plural"], kind=names["kind"],
            namespaced=spec.get("scope", "Namespaced") == "Namespaced",
            short_names=tuple(names.get("shortNames", [])),
            status_subresource="status" in (version.get("subresources") or {}),
            columns=tuple(version["additionalPrinterColumns"]) if version.get("additionalPrinterColumns")
            else None,
            categories=tuple(names.get("categories", [])),
        ))
    return result


def api_resource_list(group: str, version: str, types: list[ResourceType]) -> Obj:
    resources = []
    for t in types:
        common = {"kind": t.kind, "namespaced": t.namespaced}
        resources.append({"name": t.plural, "singularName": t.singular, "verbs": ALL_VERBS,
                          "shortNames": list(t.short_names), "categories": list(t.categories), **common})
        if t.status_subresource:
            resources.append({"name": f"{t.plural}/status", "singularName": "",
                              "verbs": ["get", "patch", "update"], **common})
    return {"kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version, "resources": resources}


def api_group(group: str, versions: list[str]) -> Obj:
    entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": entries,
            "preferredVersion": entries[0]}


def api_group_list(types: list[ResourceType]) -> Obj:
    groups: dict[str, list[str]] = {}
    for t in types:
        if t.group and t.version not in groups.setdefault(t.group, []):
            groups[t.group].append(t.version)
    return {"kind": "APIGroupList", "apiVersion": "v1",
            "groups": [api_group(g, vs) for g, vs in sorted(groups.items())]}


def openapi_v3_root(types: list[ResourceType]) -> Obj:
    paths = {}
    for t in types:
        gv = f"api/{t.version}" if not t.group else f"apis/{t.group}/{t.version}"
        paths[gv] = {"serverRelativeURL": f"/openapi/v3/{gv}"}
    return {"paths": paths}


def openapi_v3_group_version(types: list[ResourceType]) -> Obj:
    """Just enough OpenAPI for kubectl: each kind's PATCH accepts fieldValidation.

    kubectl then leaves validation to the server (which, here, does not validate custom
    resources) instead of downloading schemas for client-side validation.
    """
    paths = {}
    for t in types:
        prefix = f"/api/{t.version}" if not t.group else f"/apis/{t.group}/{t.version}"
        scope = "/namespaces/{namespace}" if t.namespaced else ""
        gvk = {"group": t.group, "version": t.version, "kind": t.kind}
        operation = {"x-kubernetes-group-version-kind": gvk, "responses": {},
                     "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}]}
        paths[f"{prefix}{scope}/{t.plural}/{{name}}"] = {"patch": operation, "put": operation}
    return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.32.0"}, "paths": paths,
            "components": {"schemas": {}}}


@dataclass(frozen=True)
class ApiPath:
    """/api/v1/namespaces/NS/PLURAL/NAME/SUB split into its parts (plural None: discovery)."""

    group: str
    version: str
    plural: str | None = None
    namespace: str | None = None
    name: str | None = None
    subresource: str | None = None


def parse_api_path(path: str) -> ApiPath | None:
    parts = path.strip("/").split("/")
    if parts[0] == "api" and len(parts) >= 2:
        group, rest = "", parts[1:]
    elif parts[0] == "apis" and len(parts) >= 3:
        group, rest = parts[1], parts[2:]
    else:
        return None
    version, rest = rest[0], rest[1:]
    namespace = None
    namespace_subresource = len(rest) == 3 and rest[2] in ("status", "finalize")
    if rest[:1] == ["namespaces"] and len(rest) >= 3 and not namespace_subresource:
        namespace, rest = rest[1], rest[2:]
    if not rest:
        return ApiPath(group, version)
    return ApiPath(group, version, rest[0], namespace, rest[1] if len(rest) > 1 else None,
                   "/".join(rest[2:]) or None)


def discovery_document(path: str, types: list[ResourceType]) -> Obj | None:
    """The answer to a non-resource GET (/version, /api, /apis, /openapi/v3, ...); None: 404."""
    parts = path.strip("/").split("/")
    if path == "/version":
        return {"major": "1", "minor": "32", "gitVersion": "v1.32.0-kuberlhf-emulator",
                "platform": "linux/amd64"}
    if path == "/openapi/v3":
        return openapi_v3_root(types)
    if path.startswith("/openapi/v3/"):
        wanted = path.removeprefix("/openapi/v3/").split("/")
        group, version = ("", wanted[1]) if wanted[0] == "api" else (wanted[1], wanted[2])
        served = [t for t in types if (t.group, t.version) == (group, version)]
        return openapi_v3_group_version(served)
    if path == "/api":
        return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
    if path == "/apis":
        return api_group_list(types)
    if parts[0] == "api" and len(parts) == 2:
        return api_resource_list("", parts[1], [t for t in types if t.group == ""])
    if parts[0] == "apis" and len(parts) == 2:
        versions = [t.version for t in types if t.group == parts[1]]
        if versions:
            return api_group(parts[1], list(dict.fromkeys(versions)))
    if parts[0] == "apis" and len(parts) == 3:
        matching = [t for t in types if (t.group, t.version) == (parts[1], parts[2])]
        if matching:
            return api_resource_list(parts[1], parts[2], matching)
    return None
