"""The operator's door to the API server: a few plain REST calls through the kubernetes client.

Plain paths instead of the generated typed APIs: the operator touches seven kinds with four
verbs, and one helper that speaks JSON and merge patches keeps every call (and so the RBAC
the Helm chart must grant) visible in one place:

    kuberlhf.io   rlhfjobs                  get          (+ list/watch/patch by kopf)
    kuberlhf.io   rlhfjobs/status           patch
    ray.io        rayjobs                   get, create, patch   (+ list/watch by kopf)
    ray.io        rayclusters               get          (+ list/watch by kopf)
    ""            configmaps, serviceaccounts, persistentvolumeclaims   get, create, patch
    rbac...       roles, rolebindings       get, create, patch
    networking... networkpolicies           get, create, patch
    policy        poddisruptionbudgets      get, create, patch
    kuberlhf.io   rlhfjobs/finalizers       update       (no call: OwnerReferencesPermissionEnforcement)
    ""            events                    create       (kopf: create too)
    ""            namespaces                list, watch  (kopf's namespace observer)

`OPERATOR_RULES` is that table as RBAC rules; the tests run the operator bound to exactly
these rules (with RBAC enforced) and fail on any 403. `rlhfjobs/finalizers` is used by no request:
every child's owner reference sets blockOwnerDeletion, and where the OwnerReferencesPermissionEnforcement
admission plugin runs (OpenShift) it refuses that unless the creator may update the owner's finalizers.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from typing import Any

import kubernetes

from kuberlhf.kube import Obj

PLURALS = {
    "ServiceAccount": "serviceaccounts",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "ConfigMap": "configmaps",
    "NetworkPolicy": "networkpolicies",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "RayJob": "rayjobs",
    "RayCluster": "rayclusters",
    "RLHFJob": "rlhfjobs",
    "Event": "events",
}


_CHILD_VERBS = ["get", "create", "patch"]
OPERATOR_RULES: list[Obj] = [
    {"apiGroups": ["kuberlhf.io"], "resources": ["rlhfjobs"], "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": ["kuberlhf.io"], "resources": ["rlhfjobs/status"], "verbs": ["get", "patch"]},
    {"apiGroups": ["kuberlhf.io"], "resources": ["rlhfjobs/finalizers"], "verbs": ["update"]},
    {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["get", "list", "watch", "create", "patch"]},
    {"apiGroups": ["ray.io"], "resources": ["rayclusters"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["configmaps", "serviceaccounts", "persistentvolumeclaims"],
     "verbs": _CHILD_VERBS},
    {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles", "rolebindings"],
     "verbs": _CHILD_VERBS},
    {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": _CHILD_VERBS},
    {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"], "verbs": _CHILD_VERBS},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
]


# Answers that say "try again" (throttled, overloaded, restarting): retried here with capped,
# jittered backoff, because a handler that fails instead waits kopf's 60 s retry, and an event
# handler (RayJob / RayCluster status) is not retried by kopf at all: its status update would be lost.
TRANSIENT = frozenset({429, 500, 502, 503, 504})
RETRIES = 6
MAX_DELAY_S = 5.0


def retry_delay(attempt: int, retry_after: str | None, rng: random.Random | None = None) -> float:
    """Seconds before retry `attempt` (0-based): the server's Retry-After if it sent one, else 0.1 s
    doubling with jitter; never more than MAX_DELAY_S, so a bogus Retry-After cannot stall the operator."""
    if retry_after is not None:
        try:
            return min(max(float(retry_after), 0.0), MAX_DELAY_S)
        except ValueError:
            pass
    base = min(0.1 * 2.0**attempt, MAX_DELAY_S)
    jitter = rng.random() if rng is not None else random.random()
    return base * (0.5 + 0.5 * jitter)


class ApiError(Exception):
    """A non-2xx answer; `status` is the HTTP code (409 conflict, 404 gone, ...)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def object_path(api_version: str, kind: str, namespace: str | None, name: str | None = None) -> str:
    prefix = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    scope = f"/namespaces/{namespace}" if namespace else ""
    plural = PLURALS.get(kind) or (kind[:-1] + "ies" if kind.endswith("y") else kind + "s").lower()
    return f"{prefix}{scope}/{plural}" + (f"/{name}" if name else "")


@dataclass
class KubeApi:
    client: kubernetes.client.ApiClient
    timeout_s: float = 10.0

    @classmethod
    def from_environment(cls, kubeconfig: str | None = None) -> KubeApi:
        """In-cluster ServiceAccount credentials, or a kubeconfig (KUBECONFIG / ~/.kube/config)."""
        in_cluster = os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG")
        if kubeconfig is None and in_cluster:
            configuration = kubernetes.client.Configuration()
            kubernetes.config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=configuration)
            return cls(kubernetes.client.ApiClient(configuration))
        return cls(kubernetes.config.new_client_from_config(config_file=kubeconfig))  # type: ignore[no-untyped-call]

    @property
    def configuration(self) -> kubernetes.client.Configuration:
        configuration: kubernetes.client.Configuration = self.client.configuration
        return configuration

    def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> Obj:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        method, url, headers, body, _ = self.client.param_serialize(
            method, path, header_params=headers, body=body, auth_settings=["BearerToken"])
        for attempt in range(RETRIES + 1):
            response = self.client.call_api(method, url, headers, body, _request_timeout=self.timeout_s)
            data = response.read()  # type: ignore[no-untyped-call]
            if response.status not in TRANSIENT or attempt == RETRIES:
                break
            time.sleep(retry_delay(attempt, response.getheader("Retry-After")))  # type: ignore[no-untyped-call]
        decoded = json.loads(data) if data else {}
        if not 200 <= response.status < 300:
            raise ApiError(response.status, decoded.get("message", "") if isinstance(decoded, dict) else "")
        return dict(decoded)

    def get(self, path: str) -> Obj | None:
        try:
            return self.request("GET", path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, path: str) -> list[Obj]:
        """The items of a collection (one page: the operator lists only one namespace's RLHFJobs)."""
        return list(self.request("GET", path).get("items") or [])

    def create(self, obj: Obj) -> Obj:
        meta = obj["metadata"]
        return self.request("POST", object_path(obj["apiVersion"], obj["kind"], meta.get("namespace")), obj)

    def merge_patch(self, path: str, patch: Obj) -> Obj:
        return self.request("PATCH", path, patch, "application/merge-patch+json")

    def post_event(self, involved: Obj, type_: str, reason: str, message: str, now: str) -> None:
        """A core/v1 Event on `involved`, as `kubectl describe` shows them."""
        meta = involved["metadata"]
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta.get("namespace")},
            "involvedObject": {"apiVersion": involved.get("apiVersion"), "kind": involved.get("kind"),
                               "name": meta["name"], "namespace": meta.get("namespace"),
                               "uid": meta.get("uid"), "resourceVersion": meta.get("resourceVersion")},
            "type": type_, "reason": reason, "message": message[:1024],
            "source": {"component": "kuberlhf-operator"}, "reportingComponent": "kuberlhf-operator",
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
        self.request("POST", object_path("v1", "Event", meta.get("namespace")), event)
