"""RBAC evaluation for the API emulator (pure).

The emulator stores Roles, ClusterRoles and their bindings as ordinary objects; this module
decides whether a user may perform one request, the way kube-apiserver's RBAC authorizer
does (union of allow rules, no deny), so tests can check the operator's and the driver's
least privilege against the very Role objects the project ships.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Obj = dict[str, Any]


@dataclass(frozen=True)
class Attributes:
    """What is being asked: the RBAC view of one request."""

    user: str
    verb: str
    group: str
    resource: str
    namespace: str | None
    name: str | None = None
    subresource: str | None = None


def request_verb(method: str, has_name: bool, watch: bool) -> str:
    if method == "GET":
        return "watch" if watch else ("get" if has_name else "list")
    return {"POST": "create", "PUT": "update", "PATCH": "patch",
            "DELETE": "delete" if has_name else "deletecollection"}.get(method, method.lower())


def _subject_matches(subject: Obj, user: str, binding_namespace: str | None) -> bool:
    kind = subject.get("kind")
    if kind == "ServiceAccount":
        namespace = subject.get("namespace") or binding_namespace
        return user == f"system:serviceaccount:{namespace}:{subject.get('name')}"
    if kind == "User":
        return user == subject.get("name")
    if kind == "Group":
        return subject.get("name") == "system:authenticated" or (
            subject.get("name") == "system:serviceaccounts" and user.startswith("system:serviceaccount:"))
    return False


def rule_allows(rule: Obj, attrs: Attributes) -> bool:
    resource = attrs.resource + (f"/{attrs.subresource}" if attrs.subresource else "")
    groups = rule.get("apiGroups") or []
    resources = rule.get("resources") or []
    verbs = rule.get("verbs") or []
    names = rule.get("resourceNames") or []
    return (
        ("*" in groups or attrs.group in groups)
        and ("*" in resources or resource in resources
             or (attrs.subresource is not None and f"{attrs.resource}/*" in resources))
        and ("*" in verbs or attrs.verb in verbs)
        and (not names or (attrs.name is not None and attrs.name in names))
    )


def allowed(attrs: Attributes, roles: list[Obj], cluster_roles: list[Obj],
            bindings: list[Obj], cluster_bindings: list[Obj]) -> bool:
    """True when any binding of the user grants a rule that covers the request."""
    role_index = {(r["metadata"].get("namespace"), r["metadata"]["name"]): r for r in roles}
    cluster_index = {r["metadata"]["name"]: r for r in cluster_roles}

    def grants(role: Obj | None) -> bool:
        return role is not None and any(rule_allows(rule, attrs) for rule in role.get("rules") or [])

    for binding in cluster_bindings:
        subjects = binding.get("subjects") or []
        if any(_subject_matches(s, attrs.user, None) for s in subjects) and \
                grants(cluster_index.get(binding.get("roleRef", {}).get("name"))):
            return True
    for binding in bindings:
        namespace = binding["metadata"].get("namespace")
        if namespace != attrs.namespace:
            continue
        if not any(_subject_matches(s, attrs.user, namespace) for s in binding.get("subjects") or []):
            continue
        ref = binding.get("roleRef", {})
        role = (cluster_index.get(ref.get("name")) if ref.get("kind") == "ClusterRole"
                else role_index.get((namespace, ref.get("name"))))
        if grants(role):
            return True
    return False


def _blocking(obj: Obj | None) -> set[str]:
    refs = ((obj or {}).get("metadata") or {}).get("ownerReferences") or []
    return {ref.get("uid") for ref in refs if ref.get("blockOwnerDeletion")}


def owner_reference_checks(user: str, namespace: str | None, group: str, resource: str, new: Obj,
                           old: Obj | None, owner_resource: Callable[[str, str], tuple[str, str]]
                           ) -> list[tuple[Attributes, str]]:
    """What kube-apiserver's OwnerReferencesPermissionEnforcement admission plugin (on in OpenShift)
    authorizes before a write that touches ownerReferences, each with the message of its refusal.

    Changing the references of an existing object needs `delete` on that object; each reference that
    newly sets blockOwnerDeletion needs `update` on the owner's `finalizers` subresource (the power to
    hold up its deletion). `owner_resource(apiVersion, kind)` -> (group, plural) of the owner.
    """
    new_refs = (new.get("metadata") or {}).get("ownerReferences") or []
    old_refs = ((old or {}).get("metadata") or {}).get("ownerReferences") or []
    if new_refs == old_refs:
        return []
    name = (new.get("metadata") or {}).get("name")
    checks = []
    if old is not None:
        checks.append((Attributes(user, "delete", group, resource, namespace, name),
                       "cannot set an ownerRef on a resource you can't delete"))
    blocking_before = _blocking(old)
    for ref in new_refs:
        if ref.get("blockOwnerDeletion") and ref.get("uid") not in blocking_before:
            owner_group, owner_plural = owner_resource(ref.get("apiVersion", ""), ref.get("kind", ""))
            checks.append((Attributes(user, "update", owner_group, owner_plural, namespace, ref.get("name"),
                                      "finalizers"),
                           "cannot set blockOwnerDeletion if an ownerReference refers to a resource you "
                           "can't set finalizers on"))
    return checks
