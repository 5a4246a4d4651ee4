"""kopf handlers: RLHFJob → children (idempotently) and KubeRay's status → RLHFJob.status.

The handlers are thin and synchronous (kopf runs them in its thread pool); the decisions
live in pure functions (`immutable_changes`, `status.project`, `status.validated`) and
every API call goes through `KubeApi`. kopf keeps its own bookkeeping in annotations
(never in status), runs standalone (no peering objects) and posts only its warnings as
Events; the operator posts its own Normal/Warning Events at each transition.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from typing import Any

import kopf

from kuberlhf.api import API_VERSION, GROUP, PLURAL, VERSION, SpecError, parse_job, spec_to_dict
from kuberlhf.jobrefs import dependencies
from kuberlhf.kube import Obj, now_rfc3339
from kuberlhf_operator import dependencies as deps
from kuberlhf_operator import status as st
from kuberlhf_operator.builders import build_all, child_names
from kuberlhf_operator.kubeapi import ApiError, KubeApi, object_path
from kuberlhf_operator.metrics import Metrics
from kuberlhf_operator.names import JOB_LABEL
from kuberlhf_operator.netpol import Peers

APPLIED_SPEC = "kuberlhf.io/applied-spec"
MUTABLE_FIELDS = ("suspend", "backoffLimit", "ttlSecondsAfterFinished")
CONFLICT_RETRIES = 5
# An adopted RayJob may be running and a PVC's spec is immutable: only ownership is taken over.
KEEP_CONTENT_ON_ADOPTION = ("RayJob", "PersistentVolumeClaim")

log = logging.getLogger("kuberlhf.operator")


def plain(value: Any) -> Any:
    """kopf's Body views → plain dicts and lists (the API models and builders want JSON data)."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        flat: dict[str, Any] = {}
        for key, sub in value.items():
            flat.update(_flatten(sub, f"{prefix}.{key}" if prefix else key))
        return flat
    return {prefix: value}


def immutable_changes(applied: Obj, wanted: Obj) -> list[str]:
    """spec.* paths that differ between the launched spec and the new one, except the mutable ones.

    A running job's spec is frozen: its cluster shape, models, data and hyper-parameters are
    baked into the RayCluster and the driver's ConfigMap. Only suspend, backoffLimit and
    ttlSecondsAfterFinished are KubeRay knobs that can change under a live RayJob.
    """
    old, new = _flatten(applied, ""), _flatten(wanted, "")
    changed = {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)}
    return sorted(f"spec.{k}" for k in changed if k.split(".")[0] not in MUTABLE_FIELDS)


def mutable_patch(rayjob: Obj, built: Obj, queued: bool, suspend: bool) -> Obj:
    """The RayJob spec merge patch for the mutable knobs (empty: nothing to change).

    Kueue owns spec.suspend of a queued job: the operator may suspend it, never unsuspend it.
    """
    current, desired = rayjob.get("spec") or {}, built["spec"]
    knobs = ("backoffLimit", "ttlSecondsAfterFinished")
    patch = {k: desired[k] for k in knobs if current.get(k) != desired[k]}
    if bool(current.get("suspend")) != suspend and (suspend or not queued):
        patch["suspend"] = suspend
    return patch


class Reconciler:
    """The operator's actions; one per operator, shared by all handlers."""

    def __init__(self, api: KubeApi, metrics: Metrics, peers: Peers | None = None) -> None:
        self.api = api
        self.metrics = metrics
        self.peers = peers or Peers()
        self._status_locks: dict[tuple[str, str], threading.Lock] = {}

    def job_path(self, namespace: str, name: str, status: bool = False) -> str:
        return object_path(API_VERSION, "RLHFJob", namespace, name) + ("/status" if status else "")

    def event(self, job: Obj, type_: str, reason: str, message: str) -> None:
        try:
            self.api.post_event(job, type_, reason, message, now_rfc3339())
        except ApiError as exc:
            log.warning("could not post event %s on %s: %s", reason, job["metadata"]["name"], exc)

    def patch_status(self, job: Obj, compute: Any) -> Obj:
        """Merge-patch status keys computed from the freshest object, guarded by its resourceVersion.

        `compute(current_status) -> dict`: only the operator's keys, so status.progress (the
        driver's) is never overwritten; a 409 means someone wrote in between: re-read, redo.
        """
        meta = job["metadata"]
        for _ in range(CONFLICT_RETRIES):
            current = job.get("status") or {}
            patch = st.changed_keys(current, compute(current))
            if not patch:
                return {}
            body = {"metadata": {"resourceVersion": job["metadata"]["resourceVersion"]}, "status": patch}
            try:
                self.api.merge_patch(self.job_path(meta["namespace"], meta["name"], status=True), body)
                return patch
            except ApiError as exc:
                if exc.status != 409:
                    raise
            fresh = self.api.get(self.job_path(meta["namespace"], meta["name"]))
            if fresh is None:
                return {}
            job = fresh
        raise kopf.TemporaryError("status kept changing under the operator; retrying", delay=1)

    def refuse(self, job: Obj, reason: str, message: str) -> None:
        meta = job["metadata"]
        generation = meta.get("generation")

        def verdict(current: Obj) -> Obj:
            return st.validated(current, False, reason, message, now_rfc3339(), generation)

        self.patch_status(job, verdict)
        self.event(job, "Warning", reason, message)
        self.metrics.errors.labels(reason=reason).inc()
        log.warning("RLHFJob %s/%s refused: %s", meta["namespace"], meta["name"], message)

    def ensure(self, obj: Obj, owner_uid: str | None) -> tuple[Obj, bool]:
        """Create, or (409) adopt the existing object of that name: never a duplicate, never a GET first,
        since on the common path (a new job) every child is missing. Adopting an object made by
        someone else also overwrites its content with ours (a hand-made ConfigMap must not feed
        the driver a different spec)."""
        meta = obj["metadata"]
        path = object_path(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])
        try:
            return self.api.create(obj), True
        except ApiError as exc:
            if exc.status != 409:
                raise
        existing = self.api.get(path)
        if existing is None:
            raise kopf.TemporaryError(f"{path} was deleted while being adopted; retrying", delay=1)
        owners = existing["metadata"].get("ownerReferences") or []
        if owner_uid and not any(ref.get("uid") == owner_uid for ref in owners):
            adopt: Obj = {"metadata": {"ownerReferences": meta.get("ownerReferences", []),
                                       "labels": {**(existing["metadata"].get("labels") or {}),
                                                  **(meta.get("labels") or {})}}}
            if obj["kind"] not in KEEP_CONTENT_ON_ADOPTION:
                adopt.update({k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")})
            existing = self.api.merge_patch(path, adopt)
        return existing, False

    def reconcile(self, body: Obj) -> None:
        """Validate, refuse frozen-field edits, create what is missing, apply the mutable knobs.

        A job never launched before (no status.rayJobName) costs one status patch, one create per
        child and one Event: its launch is recorded (with the projection of a RayJob not yet
        reporting, which is what KubeRay's first answer would project too) before the RayJob exists,
        so no RayJob event can arrive unattributed and none needs a read-back.
        """
        self.metrics.reconciles.labels(trigger="spec").inc()
        meta = body["metadata"]
        namespace, name, generation = meta["namespace"], meta["name"], meta.get("generation")
        try:
            job = parse_job({k: v for k, v in body.items() if k != "status"})
            objects = build_all(job, namespace, self.peers)
        except SpecError as exc:
            self.refuse(body, "InvalidSpec", "; ".join(exc.problems))
            return
        names = child_names(job)
        wanted_spec = spec_to_dict(job.spec)
        status = body.get("status") or {}
        launched_before = bool(status.get("rayJobName"))
        rayjob_path = object_path("ray.io/v1", "RayJob", namespace, names.rayjob)
        rayjob = self.api.get(rayjob_path) if launched_before else None
        if rayjob is None and status.get("phase") in st.TERMINAL_PHASES:
            log.info("RLHFJob %s/%s finished and its RayJob is gone: not recreated", namespace, name)
            return
        if self._refused_frozen(body, rayjob, wanted_spec):
            return
        uses = dependencies(job.spec)
        ready: deps.Verdict | None = None
        if uses and not launched_before:
            ready = deps.verdict(job, {d: self.api.get(self.job_path(namespace, d)) for d in uses})
            if not ready.ready:
                self.hold(body, ready)
                return

        def launched(current: Obj) -> Obj:
            result = st.validated(current, True, "Valid", "the spec is valid", now_rfc3339(), generation)
            if ready is not None:
                condition = st.Condition(deps.CONDITION, True, ready.reason, ready.message)
                result["conditions"] = st.merge_conditions(result["conditions"], [condition], now_rfc3339(),
                                                           generation)
            result["rayJobName"] = names.rayjob
            if current.get("phase") in (None, st.PENDING):
                result["phase"] = st.LAUNCHING
            if not launched_before:
                result.update(st.project({**current, **result}, None, None, now_rfc3339()))
            return result

        changed = self.patch_status(body, launched)
        built_rayjob = next(obj for obj in objects if obj["kind"] == "RayJob")
        applied_now = json.dumps(wanted_spec, sort_keys=True)
        built_rayjob["metadata"].setdefault("annotations", {})[APPLIED_SPEC] = applied_now
        uid = meta.get("uid")
        created = []
        for obj in objects:
            existing, made = self.ensure(obj, uid)
            if made:
                created.append(obj["kind"])
            elif obj is built_rayjob and rayjob is None:
                # Launched by an operator that stopped before recording it: check it like an edit.
                rayjob = existing
                if self._refused_frozen(body, rayjob, wanted_spec):
                    return
        if rayjob is not None:
            applied = (rayjob["metadata"].get("annotations") or {}).get(APPLIED_SPEC)
            patch = mutable_patch(rayjob, built_rayjob, job.spec.queue_name is not None, job.spec.suspend)
            if patch or applied != applied_now:
                annotations = {APPLIED_SPEC: applied_now}
                self.api.merge_patch(rayjob_path, {"metadata": {"annotations": annotations}, "spec": patch})
                if "suspend" in patch:
                    verb = "Suspending" if patch["suspend"] else "Resuming"
                    self.event(body, "Normal", verb, f"{verb.lower()} RayJob {names.rayjob}")
        if created:
            self.event(body, "Normal", "Launching",
                       f"created {', '.join(created)}; RayJob {names.rayjob} is starting")
            log.info("RLHFJob %s/%s: created %s", namespace, name, ", ".join(created))
        phase = changed.get("phase") or status.get("phase")
        self.metrics.observe_phase(namespace, name, phase)
        if rayjob is not None:
            # A RayJob that existed before this reconcile may have reported while status.rayJobName
            # was unwritten (an operator restart, a quick KubeRay): those events were dropped, so
            # project its state now, or the job would wait in Launching for its next change. Read
            # afresh: the copy read above is a dozen requests old, and a RayJob event handled in
            # between (it finished) must not be overwritten by it.
            self.sync_status(namespace, name)

    def hold(self, body: Obj, verdict: deps.Verdict) -> None:
        """Keep a job Pending until the jobs it uses succeed, or fail it; one Event per change."""
        meta = body["metadata"]
        conditions: list[Obj] = (body.get("status") or {}).get("conditions") or []
        before: Obj = next((c for c in conditions if c.get("type") == deps.CONDITION), {})
        generation = meta.get("generation")
        self.patch_status(body, lambda current: st.held(
            current, verdict.failed, verdict.reason, verdict.message, now_rfc3339(), generation))
        if (before.get("reason"), before.get("message")) != (verdict.reason, verdict.message):
            self.event(body, "Warning" if verdict.failed else "Normal", verdict.reason, verdict.message)
            log.info("RLHFJob %s/%s: %s", meta["namespace"], meta["name"], verdict.message)
        phase = st.FAILED if verdict.failed else st.PENDING
        self.metrics.observe_phase(meta["namespace"], meta["name"], phase)

    def release_dependents(self, namespace: str, finished: str) -> None:
        """Re-reconcile the jobs held back by `finished`, which has just succeeded or failed."""
        for other in self.api.list(object_path(API_VERSION, "RLHFJob", namespace)):
            status = other.get("status") or {}
            if status.get("rayJobName") or status.get("phase") in st.TERMINAL_PHASES:
                continue
            try:
                spec = parse_job({k: v for k, v in other.items() if k != "status"}).spec
            except SpecError:
                continue
            if finished in dependencies(spec):
                other.setdefault("metadata", {}).setdefault("namespace", namespace)
                self.reconcile(other)

    def _refused_frozen(self, body: Obj, rayjob: Obj | None, wanted_spec: Obj) -> bool:
        """Refuse (and say so) an edit of a launched job's frozen fields."""
        applied = ((rayjob or {}).get("metadata", {}).get("annotations") or {}).get(APPLIED_SPEC)
        frozen = immutable_changes(json.loads(applied), wanted_spec) if applied is not None else []
        if frozen:
            self.refuse(body, "ImmutableFieldChanged",
                        f"cannot change {', '.join(frozen)} of a launched RLHFJob; revert the change, "
                        "or delete the RLHFJob and create a new one (it resumes from checkpoints "
                        "only if it keeps the same checkpoint volume)")
        return bool(frozen)

    def sync_status(self, namespace: str, job_name: str, rayjob: Obj | None = None) -> None:
        """Project the RayJob / RayCluster state into the RLHFJob's phase and conditions.

        `rayjob` is a RayJob event's body (kopf hands one object's events over in order); without
        it the RayJob is read here. One projection per job at a time: kopf runs the RLHFJob's and
        the RayJob's handlers in parallel threads, and a projection that read the RayJob before
        another wrote a newer one would otherwise undo it (a finished job back to Running, for good).
        """
        self.metrics.reconciles.labels(trigger="rayjob").inc()
        with self._status_locks.setdefault((namespace, job_name), threading.Lock()):
            self._sync_status(namespace, job_name, rayjob)

    def _sync_status(self, namespace: str, job_name: str, rayjob: Obj | None) -> None:
        job = self.api.get(self.job_path(namespace, job_name))
        if job is None or job["metadata"].get("deletionTimestamp"):
            self.metrics.observe_phase(namespace, job_name, None)
            return
        rayjob_name = (job.get("status") or {}).get("rayJobName")
        if not rayjob_name:
            return
        if rayjob is None or rayjob["metadata"]["name"] != rayjob_name:
            rayjob = self.api.get(object_path("ray.io/v1", "RayJob", namespace, rayjob_name))
        cluster_name = ((rayjob or {}).get("status") or {}).get("rayClusterName")
        raycluster = self.api.get(object_path("ray.io/v1", "RayCluster", namespace, cluster_name)) \
            if cluster_name else None
        before = (job.get("status") or {}).get("phase")
        changed = self.patch_status(job, lambda cur: st.project(cur, rayjob, raycluster, now_rfc3339()))
        phase = changed.get("phase")
        if phase and phase != before:
            failed = phase == st.FAILED
            rayjob_status = (rayjob or {}).get("status") or {}
            detail = changed.get("message") or rayjob_status.get("jobDeploymentStatus", "")
            self.event(job, "Warning" if failed else "Normal", phase, f"phase {before or '-'} → {phase}"
                       + (f" ({detail})" if detail else ""))
            log.info("RLHFJob %s/%s: %s → %s", namespace, job_name, before, phase)
        self.metrics.observe_phase(namespace, job_name, phase or before)


def make_settings(settings: kopf.OperatorSettings | None = None) -> kopf.OperatorSettings:
    """kopf's state in annotations, standalone, quiet Events, one resource scan at start."""
    settings = settings or kopf.OperatorSettings()
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    settings.peering.standalone = True
    settings.peering.mandatory = False
    settings.posting.level = logging.WARNING
    settings.scanning.disabled = True
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 30
    return settings


def build_registry(api: KubeApi, metrics: Metrics, peers: Peers | None = None) -> kopf.OperatorRegistry:
    """A fresh registry with every handler bound to one Reconciler (one per operator / test)."""
    registry = kopf.OperatorRegistry()
    reconciler = Reconciler(api, metrics, peers)
    job_labels = {JOB_LABEL: kopf.PRESENT}

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return connection_info(api)

    @kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.update(GROUP, VERSION, PLURAL, field="spec", registry=registry)
    def rlhfjob_changed(body: kopf.Body, **_: Any) -> None:
        reconciler.reconcile(plain(body))

    @kopf.on.event("ray.io", "v1", "rayjobs", labels=job_labels, registry=registry)
    def rayjob_event(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
        raw = plain(body)
        deleted = event.get("type") == "DELETED"
        if not deleted and not raw.get("status"):
            return  # a RayJob that reports nothing projects as its launch did: nothing to do
        rayjob = None if deleted else raw
        reconciler.sync_status(raw["metadata"]["namespace"], raw["metadata"]["labels"][JOB_LABEL], rayjob)

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    def rlhfjob_event(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
        # A job that has just finished may be what others wait for (`job:<name>` models).
        phase = (body.get("status") or {}).get("phase")
        if event.get("type") != "DELETED" and phase in st.TERMINAL_PHASES:
            reconciler.release_dependents(body["metadata"]["namespace"], body["metadata"]["name"])

    @kopf.on.event("ray.io", "v1", "rayclusters", labels=job_labels, registry=registry)
    def raycluster_event(body: kopf.Body, **_: Any) -> None:
        meta = body["metadata"]
        reconciler.sync_status(meta["namespace"], meta["labels"][JOB_LABEL])

    return registry


def connection_info(api: KubeApi) -> kopf.ConnectionInfo:
    """kopf talks to the same server with the same credentials as the operator's client."""
    config = api.configuration
    if config.refresh_api_key_hook is not None:
        config.refresh_api_key_hook(config)
    header = (config.api_key or {}).get("authorization") or (config.api_key or {}).get("BearerToken") or ""
    token = header.split(" ", 1)[1] if header.lower().startswith("bearer ") else header or None
    return kopf.ConnectionInfo(
        server=config.host, token=token, ca_path=config.ssl_ca_cert, insecure=not config.verify_ssl,
        certificate_path=config.cert_file, private_key_path=config.key_file,
        username=config.username or None, password=config.password or None,
    )
