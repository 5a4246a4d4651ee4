"""A realistic Kubernetes API server for tests: a subclass of kmock's KubernetesEmulator.

kmock 0.8 (pinned: this class overrides its private `_handle`) parses requests, keeps
its request list and serves non-Kubernetes paths; everything under /api and /apis is
answered here with the semantics kopf and kubectl depend on: resourceVersions, uids,
generations, 201/409/410/422, status-subresource separation, merge / JSON patches, PUT,
selectors, resumable watches from an event log, garbage collection, finalizers, Table
rendering, discovery from applied CRDs, and optional bearer-token RBAC.
Server-side apply is approximated as create-or-merge-patch (no field managers, no
conflicts). Of admission, only OwnerReferencesPermissionEnforcement is emulated, on request
(`enforce_owner_references`). Not emulated: other admission (schema / CEL validation of custom
resources), dryRun (refused with 400), pagination, protobuf bodies (415).
"""

from __future__ import annotations

import asyncio
import bisect
import copy
import json
import secrets
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp.web
import attrs
import kmock
import yaml
from kmock._internal import rendering

from tests.emulator import objects, rbac
from tests.emulator.faults import FaultPlan
from tests.emulator.objects import Obj, PatchError
from tests.emulator.resources import (
    BUILTINS,
    ApiPath,
    ResourceType,
    discovery_document,
    parse_api_path,
    types_from_crd,
)

ADMIN = "admin"
LOG_LIMIT = 20000


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


@dataclass
class LoggedRequest:
    """One API call as tests see it: who did what to which object, and the answer code."""

    method: str
    path: str
    query: str
    user: str
    verb: str | None
    resource: str | None
    namespace: str | None
    name: str | None
    subresource: str | None
    status: int = 0


@dataclass(frozen=True)
class Change:
    rv: int
    key: tuple[str, str]
    type: str
    obj: Obj


def _json(data: Any, status: int = 200) -> aiohttp.web.Response:
    return aiohttp.web.Response(text=json.dumps(data), status=status, content_type="application/json")


def _spec_part(obj: Obj) -> Obj:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


@attrs.define(kw_only=True)
class ApiServerEmulator(kmock.KubernetesEmulator):
    """kmock's emulator made realistic enough for kopf and the real kubectl."""

    authorize: bool = False
    # Emulate the OwnerReferencesPermissionEnforcement admission plugin (off in kube-apiserver's
    # defaults, on in OpenShift); only bites where `authorize` is on.
    enforce_owner_references: bool = False
    admin_token: str = attrs.field(factory=lambda: secrets.token_hex(16))
    tokens: dict[str, str] = attrs.field(factory=dict)
    superusers: set[str] = attrs.field(factory=lambda: {ADMIN, "kuberay-standin"})
    faults: FaultPlan = attrs.field(factory=FaultPlan)
    log: list[LoggedRequest] = attrs.field(factory=list, init=False)
    store: dict[tuple[str, str], dict[tuple[str | None, str], Obj]] = attrs.field(factory=dict, init=False)
    types: dict[tuple[str, str, str], ResourceType] = attrs.field(factory=dict, init=False)
    changes: list[Change] = attrs.field(factory=list, init=False)
    compacted_rv: int = attrs.field(default=0, init=False)
    rv: int = attrs.field(default=100, init=False)
    _tick: asyncio.Event | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for rtype in BUILTINS:
            self.types[(rtype.group, rtype.version, rtype.plural)] = rtype
        self.tokens[self.admin_token] = ADMIN
        for name in ("default", "kube-system"):
            self.put_object(("", "namespaces"), None, {"apiVersion": "v1", "kind": "Namespace",
                                                       "metadata": {"name": name}})

    # ----- state -------------------------------------------------------------------------
    def _commit(self, key: tuple[str, str], event: str, obj: Obj) -> Obj:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        bucket = self.store.setdefault(key, {})
        ident = (obj["metadata"].get("namespace"), obj["metadata"]["name"])
        if event == "DELETED":
            bucket.pop(ident, None)
        else:
            bucket[ident] = obj
        self.changes.append(Change(self.rv, key, event, copy.deepcopy(obj)))
        if len(self.changes) > LOG_LIMIT:
            self.compact(len(self.changes) // 4)
        if self._tick is not None:
            self._tick.set()
        self._tick = asyncio.Event()
        self._after_commit(key, event, obj)
        return obj

    def compact(self, count: int) -> None:
        """Forget the oldest `count` changes; watches from before them get 410 Gone."""
        if count > 0 and self.changes:
            self.compacted_rv = self.changes[min(count, len(self.changes)) - 1].rv
            del self.changes[:count]

    def _after_commit(self, key: tuple[str, str], event: str, obj: Obj) -> None:
        if key == ("apiextensions.k8s.io", "customresourcedefinitions"):
            for rtype in types_from_crd(obj):
                ident = (rtype.group, rtype.version, rtype.plural)
                if event == "DELETED":
                    self.types.pop(ident, None)
                    for gone in list(self.store.get((rtype.group, rtype.plural), {}).values()):
                        self._commit((rtype.group, rtype.plural), "DELETED", gone)
                else:
                    self.types[ident] = rtype
        if event == "DELETED":
            self._collect_garbage()

    def _collect_garbage(self) -> None:
        live = {o["metadata"]["uid"] for bucket in self.store.values() for o in bucket.values()}
        for key, bucket in list(self.store.items()):
            for obj in list(bucket.values()):
                if not objects.owners_alive(obj, live) and not obj["metadata"].get("deletionTimestamp"):
                    self._delete(key, obj)

    def _delete(self, key: tuple[str, str], obj: Obj) -> Obj:
        obj = copy.deepcopy(obj)
        if obj["metadata"].get("finalizers"):
            obj["metadata"]["deletionTimestamp"] = objects.now_rfc3339()
            obj["metadata"]["generation"] = obj["metadata"].get("generation", 1) + 1
            return self._commit(key, "MODIFIED", obj)
        if key == ("", "namespaces"):
            for other_key, bucket in list(self.store.items()):
                for child in list(bucket.values()):
                    if child["metadata"].get("namespace") == obj["metadata"]["name"]:
                        self._delete(other_key, child)
        return self._commit(key, "DELETED", obj)

    def get_object(self, key: tuple[str, str], namespace: str | None, name: str) -> Obj | None:
        return self.store.get(key, {}).get((namespace, name))

    def put_object(self, key: tuple[str, str], namespace: str | None, obj: Obj) -> Obj:
        """Create an object directly (fixtures), with the metadata a create would give it."""
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta.update({"uid": str(uuid.uuid4()), "creationTimestamp": objects.now_rfc3339(), "generation": 1})
        if namespace is not None:
            meta["namespace"] = namespace
        return self._commit(key, "ADDED", obj)

    # ----- HTTP --------------------------------------------------------------------------
    def _user(self, headers: dict[str, str]) -> str:
        auth = {k.lower(): v for k, v in headers.items()}.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else None
        if token is None:
            return "system:anonymous"
        if token not in self.tokens:
            raise ApiError(401, "Unauthorized", "Unauthorized: unknown bearer token")
        return self.tokens[token]

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """API paths bypass kmock's request parser (it cannot split /api/v1/namespaces)."""
        path = raw_request.path
        if not (path.startswith(("/api/", "/apis", "/openapi")) or path in ("/api", "/version")):
            return await super().__call__(raw_request)
        request = rendering.Request(
            id=len(self._requests), raw_request=raw_request, url=raw_request.url, method=raw_request.method,
            params=dict(raw_request.query), headers=dict(raw_request.headers), body=await raw_request.read())
        self._requests.append(request)
        try:
            return await self._handle(request)
        except Exception as exc:
            return _json(objects.status_error(500, "InternalError", repr(exc)), 500)

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        raw = request._raw_request
        assert raw is not None
        path = raw.path
        params = dict(raw.query)
        watch = params.get("watch") in ("true", "1")
        where = parse_api_path(path)
        entry = LoggedRequest(raw.method, path, raw.query_string, "?", None, where and where.plural,
                              where and where.namespace, where and where.name, where and where.subresource)
        self.log.append(entry)
        try:
            entry.user = self._user(dict(raw.headers))
            if where is not None and where.plural is not None:
                entry.verb = rbac.request_verb(raw.method, where.name is not None, watch)
            injected = self.faults.intercept(raw.method, path, entry.user, watch)
            response: aiohttp.web.StreamResponse
            if injected is not None:
                response = _json(objects.status_error(injected.status, injected.reason, injected.message),
                                 injected.status)
                response.headers.update(injected.headers)
            elif where is None or where.plural is None:
                response = self._discovery(path)
            else:
                response = await self._serve(where, request.body, raw, params, entry, watch)
        except ApiError as exc:
            response = _json(objects.status_error(exc.code, exc.reason, exc.message), exc.code)
        except PatchError as exc:
            response = _json(objects.status_error(422, "Invalid", str(exc)), 422)
        entry.status = response.status
        return response

    def _discovery(self, path: str) -> aiohttp.web.Response:
        document = discovery_document(path, list(self.types.values()))
        if document is None:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
        return _json(document)

    def _find_type(self, where: ApiPath) -> ResourceType:
        rtype = self.types.get((where.group, where.version, where.plural or ""))
        if rtype is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource "
                           f"({where.group}/{where.version} {where.plural})")
        return rtype

    def _authorize(self, entry: LoggedRequest, rtype: ResourceType) -> None:
        if not self.authorize or entry.user in self.superusers:
            return
        attributes = rbac.Attributes(entry.user, entry.verb or "", rtype.group, rtype.plural, entry.namespace,
                                     entry.name, entry.subresource)
        if not self._allowed(attributes):
            what = rtype.plural + (f"/{entry.subresource}" if entry.subresource else "")
            raise ApiError(403, "Forbidden", f'{what} "{entry.name or ""}" is forbidden: User "{entry.user}" '
                           f'cannot {entry.verb} resource "{what}" in API group "{rtype.group}" '
                           f'in the namespace "{entry.namespace}"')

    def _allowed(self, attributes: rbac.Attributes) -> bool:
        rb = "rbac.authorization.k8s.io"
        listing = [list(self.store.get((rb, plural), {}).values())
                   for plural in ("roles", "clusterroles", "rolebindings", "clusterrolebindings")]
        return rbac.allowed(attributes, *listing)

    def _owner_resource(self, api_version: str, kind: str) -> tuple[str, str]:
        group, _, version = api_version.rpartition("/")
        found = next((t for t in self.types.values()
                      if (t.group, t.version, t.kind) == (group, version, kind)), None)
        return (group, found.plural if found else kind.lower() + "s")

    def _admit_owner_references(self, entry: LoggedRequest, rtype: ResourceType, new: Any,
                                old: Obj | None) -> None:
        if not (self.enforce_owner_references and self.authorize) or entry.user in self.superusers:
            return
        if not isinstance(new, dict):
            return
        checks = rbac.owner_reference_checks(entry.user, entry.namespace, rtype.group, rtype.plural, new, old,
                                             self._owner_resource)
        for attributes, refusal in checks:
            if not self._allowed(attributes):
                what = attributes.resource + (f"/{attributes.subresource}" if attributes.subresource else "")
                name = (new.get("metadata") or {}).get("name", "")
                raise ApiError(403, "Forbidden", f'{rtype.plural} "{name}" is forbidden: {refusal}: User '
                               f'"{entry.user}" cannot {attributes.verb} resource "{what}" in API group '
                               f'"{attributes.group}" in the namespace "{attributes.namespace}"')

    async def _serve(self, request: ApiPath, raw_body: bytes, raw: aiohttp.web.BaseRequest,
                     params: dict[str, str], entry: LoggedRequest, watch: bool) -> aiohttp.web.StreamResponse:
        rtype = self._find_type(request)
        self._authorize(entry, rtype)
        key = (rtype.group, rtype.plural)
        namespace = request.namespace if rtype.namespaced else None
        as_table = "as=Table" in raw.headers.get("Accept", "")
        content_type = raw.headers.get("Content-Type", "")
        if "protobuf" in content_type:
            raise ApiError(415, "UnsupportedMediaType", "this API emulator speaks JSON only (kubectl's typed "
                           "generators such as `kubectl create configmap` send protobuf: use `apply -f`)")
        if "dryRun" in params:
            raise ApiError(400, "BadRequest", "dryRun is not emulated")
        try:
            body = (yaml.safe_load(raw_body) if "apply-patch+yaml" in content_type
                    else json.loads(raw_body)) if raw_body else None
        except ValueError:
            raise ApiError(400, "BadRequest", "the request body is not JSON") from None
        if watch:
            return await self._watch(rtype, namespace, params, raw, as_table)
        if raw.method == "GET" and request.name is None:
            items = self._select(key, namespace, params)
            if as_table:
                return _json(objects.table(items, list(rtype.columns or []) or None, str(self.rv)))
            return _json({"kind": f"{rtype.kind}List", "apiVersion": rtype.api_version,
                          "metadata": {"resourceVersion": str(self.rv)}, "items": items})
        if raw.method == "POST":
            self._admit_owner_references(entry, rtype, body, None)
            return _json(self._create(rtype, namespace, body), 201)
        if request.name is None:
            raise ApiError(405, "MethodNotAllowed", f"{raw.method} needs an object name")
        current = self.get_object(key, namespace, request.name)
        server_side_apply = raw.method == "PATCH" and "apply-patch" in content_type
        if current is None and server_side_apply:
            return _json(self._create(rtype, namespace, body), 201)
        if current is None:
            raise ApiError(404, "NotFound", f'{rtype.plural}.{rtype.group} "{request.name}" not found')
        if raw.method == "GET":
            return _json(objects.table([current], list(rtype.columns or []) or None, str(self.rv))
                         if as_table else current)
        if raw.method == "DELETE":
            policy = (body or {}).get("propagationPolicy") or params.get("propagationPolicy")
            if policy == "Orphan":
                self._orphan(current["metadata"]["uid"])
            return _json(self._delete(key, current))
        sent_rv = body.get("metadata", {}).get("resourceVersion") if isinstance(body, dict) else None
        if raw.method in ("PUT", "PATCH") and sent_rv and sent_rv != current["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {rtype.plural} '
                           f'"{request.name}": the object has been modified; please apply your '
                           'changes to the latest version and try again')
        if raw.method == "PUT":
            wanted = body or {}
        elif raw.method == "PATCH":
            if "json-patch" in content_type:
                wanted = objects.json_patch(current, body)
            elif "merge-patch" in content_type or server_side_apply:
                wanted = objects.merge_patch(current, body)
            else:
                raise ApiError(415, "UnsupportedMediaType", f"unsupported patch type {content_type!r}")
        else:
            raise ApiError(405, "MethodNotAllowed", f"{raw.method} is not supported")
        if request.subresource is None:
            self._admit_owner_references(entry, rtype, wanted, current)
        return _json(self._update(rtype, current, wanted, request.subresource))

    def _orphan(self, uid: str) -> None:
        for key, bucket in list(self.store.items()):
            for obj in list(bucket.values()):
                refs = obj["metadata"].get("ownerReferences") or []
                if any(r.get("uid") == uid for r in refs):
                    obj = copy.deepcopy(obj)
                    obj["metadata"]["ownerReferences"] = [r for r in refs if r.get("uid") != uid]
                    self._commit(key, "MODIFIED", obj)

    def _select(self, key: tuple[str, str], namespace: str | None, params: dict[str, str]) -> list[Obj]:
        found = []
        bucket = self.store.get(key, {})
        for (ns, _), obj in sorted(bucket.items(), key=lambda kv: (kv[0][0] or "", kv[0][1])):
            if namespace is not None and ns != namespace:
                continue
            labels = obj["metadata"].get("labels")
            if objects.label_selector_matches(params.get("labelSelector"), labels) and \
                    objects.field_selector_matches(params.get("fieldSelector"), obj):
                found.append(obj)
        return found

    def _create(self, rtype: ResourceType, namespace: str | None, body: Obj | None) -> Obj:
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the request body must be a JSON object")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise ApiError(422, "Invalid", "metadata.name: Required value: name or generateName "
                               "is required")
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        if rtype.namespaced:
            namespace = namespace or meta.get("namespace")
            if self.get_object(("", "namespaces"), None, namespace or "") is None:
                raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found')
            if meta.get("namespace") not in (None, namespace):
                raise ApiError(400, "BadRequest", "the namespace of the object does not match the URL")
        key = (rtype.group, rtype.plural)
        if self.get_object(key, namespace, meta["name"]) is not None:
            raise ApiError(409, "AlreadyExists", f'{rtype.plural} "{meta["name"]}" already exists')
        if rtype.status_subresource and key != ("apiextensions.k8s.io", "customresourcedefinitions"):
            obj.pop("status", None)
        obj["apiVersion"], obj["kind"] = rtype.api_version, rtype.kind
        for dropped in ("deletionTimestamp", "resourceVersion", "uid", "creationTimestamp"):
            meta.pop(dropped, None)
        if key == ("apiextensions.k8s.io", "customresourcedefinitions"):
            obj["status"] = {"conditions": [
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted"},
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts"}],
                "acceptedNames": obj.get("spec", {}).get("names", {})}
        if key == ("", "namespaces"):
            obj["status"] = {"phase": "Active"}
        return self.put_object(key, namespace, obj)

    def _update(self, rtype: ResourceType, current: Obj, wanted: Obj, subresource: str | None) -> Obj:
        if not isinstance(wanted, dict):
            raise ApiError(400, "BadRequest", "the object must be a JSON object")
        if subresource == "status":
            result = copy.deepcopy(current)
            if wanted.get("status") is None:
                result.pop("status", None)
            else:
                result["status"] = copy.deepcopy(wanted["status"])
        elif subresource is not None:
            raise ApiError(404, "NotFound", f"subresource {subresource!r} is not served")
        else:
            result = copy.deepcopy(wanted)
            if rtype.status_subresource:
                result.pop("status", None)
                if "status" in current:
                    result["status"] = copy.deepcopy(current["status"])
        meta = result.setdefault("metadata", {})
        for kept in ("uid", "creationTimestamp", "name", "namespace", "deletionTimestamp", "generation"):
            if kept in current["metadata"]:
                meta[kept] = current["metadata"][kept]
            else:
                meta.pop(kept, None)
        meta["resourceVersion"] = current["metadata"]["resourceVersion"]
        result["apiVersion"], result["kind"] = rtype.api_version, rtype.kind
        if _spec_part(result) != _spec_part(current):
            meta["generation"] = current["metadata"].get("generation", 1) + 1
        if result == current:
            return current
        key = (rtype.group, rtype.plural)
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            return self._commit(key, "DELETED", result)
        return self._commit(key, "MODIFIED", result)

    async def _watch(self, rtype: ResourceType, namespace: str | None, params: dict[str, str],
                     raw: aiohttp.web.BaseRequest, as_table: bool) -> aiohttp.web.StreamResponse:
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(raw)
        key = (rtype.group, rtype.plural)
        timeout = float(params.get("timeoutSeconds") or 3600)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        columns = list(rtype.columns or []) or None
        user = self._user(dict(raw.headers))
        drop_after = self.faults.drop_after(user)
        sent = 0

        async def send(kind: str, obj: Obj) -> None:
            nonlocal sent
            payload = objects.table([obj], columns, obj["metadata"]["resourceVersion"]) if as_table else obj
            await response.write(json.dumps({"type": kind, "object": payload}).encode() + b"\n")
            sent += 1

        start = params.get("resourceVersion")
        if not start or start == "0":
            cursor = self.rv
            for obj in self._select(key, namespace, params):
                await send("ADDED", obj)
        else:
            cursor = int(start)
            if cursor < self.compacted_rv or self.faults.expire_watch(user):
                gone = objects.status_error(410, "Expired", f"too old resource version: {cursor} "
                                            f"({self.compacted_rv})")
                await response.write(json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n")
                return response
        while loop.time() < deadline:
            tick = self._tick
            position = bisect.bisect_right(self.changes, cursor, key=lambda c: c.rv)
            for change in self.changes[position:]:
                cursor = change.rv
                meta = change.obj["metadata"]
                if change.key != key or (namespace is not None and meta.get("namespace") != namespace):
                    continue
                if objects.label_selector_matches(params.get("labelSelector"), meta.get("labels")) and \
                        objects.field_selector_matches(params.get("fieldSelector"), change.obj):
                    await send(change.type, change.obj)
                if drop_after is not None and sent >= drop_after:
                    self.faults.dropped()
                    return response
            if tick is None:
                self._tick = tick = asyncio.Event()
            try:
                await asyncio.wait_for(tick.wait(), timeout=max(0.0, deadline - loop.time()))
            except TimeoutError:
                break
        return response
