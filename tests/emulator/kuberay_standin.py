"""TEST STAND-IN for the KubeRay controller (not KubeRay): moves RayJobs through KubeRay 1.7's states.

No KubeRay can run here (no cluster, no pods), so this small controller plays its part
against the API emulator, through the API like the real one (ray-operator's rayjob_controller.go):
- New ("") names the RayCluster `<rayjob>-<5 chars>` and the Ray job, and starts the clock of
  activeDeadlineSeconds; Initializing creates the RayCluster owned by the RayJob (labels copied),
  marks it ready (state ready + HeadPodReady / RayClusterProvisioned), then Running.
- A driver exit ends Running: Complete, or Failed and Retrying while `failed < backoffLimit`.
  Retrying deletes the cluster, then goes through New again (a new cluster, a new Ray job).
- spec.suspend (from Initializing or Running) → Suspending: the RayCluster is deleted, so every
  pod of it is deleted at once; once the RayCluster object is gone (not its pods, which may still
  be in their grace period) the status is reset (jobStatus "", rayClusterName "", jobId "") and
  Suspended. suspend: false → New → Initializing.
- activeDeadlineSeconds past startTime → Failed with reason DeadlineExceeded, never retried.
- Complete / Failed with shutdownAfterJobFinishes: the RayCluster (not the RayJob) is deleted
  ttlSecondsAfterFinished after endTime.
Not modelled: the submitter Job (K8sJobMode) as an object, HTTPMode / InteractiveMode, cron
schedules, deletionStrategy, GCS fault tolerance.

What the pods do is pluggable: `runner(rayjob, configmap, cancel) -> returncode` runs in its own
thread; `cancel` (a threading.Event) is set when the pods are deleted (suspend, retry, TTL, the
RayJob's deletion). The default runner just waits `job_duration_s` and returns 0;
tests/e2e/entrypoint_runner.py runs the entrypoint for real and terminates its "pods" as kubelet
would (preStop hooks, then SIGTERM to every process at once, SIGKILL after the grace period).
"""

from __future__ import annotations

import calendar
import json
import logging
import queue
import secrets
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kuberlhf_operator.kubeapi import ApiError, KubeApi, object_path

Obj = dict[str, Any]
Runner = Callable[[Obj, "Obj | None", threading.Event], int]
STANDIN_USER = "kuberay-standin"
log = logging.getLogger("kuberay-standin")


def sleep_runner(duration_s: float = 0.5, returncode: int = 0) -> Runner:
    """A runner that 'trains' for `duration_s` (or until cancelled) and exits with `returncode`."""

    def run(rayjob: Obj, configmap: Obj | None, cancel: threading.Event) -> int:
        cancel.wait(duration_s)
        return returncode

    return run


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _epoch(timestamp: str) -> float:
    return calendar.timegm(time.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ"))


@dataclass
class _Run:
    """One attempt of one RayJob: its cluster, its runner thread, its result."""

    cluster: str
    cancel: threading.Event = field(default_factory=threading.Event)
    ready_at: float = 0.0
    thread: threading.Thread | None = None
    returncode: int | None = None


class KubeRayStandIn:
    """TEST STAND-IN for the KubeRay operator; start() / stop(), or use as a context manager."""

    def __init__(self, api: KubeApi, base_url: str, token: str, runner: Runner | None = None,
                 cluster_ready_after_s: float = 0.2, tick_s: float = 0.05) -> None:
        self.api, self.base_url, self.token = api, base_url, token
        self.runner = runner or sleep_runner()
        self.cluster_ready_after_s = cluster_ready_after_s
        self.tick_s = tick_s
        self.runs: dict[tuple[str, str], _Run] = {}
        self._dirty: queue.Queue[tuple[str, str]] = queue.Queue()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._watch, name="standin-watch", daemon=True),
                         threading.Thread(target=self._control, name="standin-control", daemon=True)]

    def __enter__(self) -> KubeRayStandIn:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for run in self.runs.values():
            run.cancel.set()
        for thread in self._threads:
            thread.join(timeout=10)

    # ----- watching ----------------------------------------------------------------------
    def _watch(self) -> None:
        version = ""
        while not self._stop.is_set():
            url = f"{self.base_url}/apis/ray.io/v1/rayjobs?watch=true&timeoutSeconds=2"
            if version:
                url += f"&resourceVersion={version}"
            request = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.token}"})
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    for line in response:
                        event = json.loads(line)
                        if event["type"] == "ERROR":
                            version = ""
                            break
                        meta = event["object"]["metadata"]
                        version = meta["resourceVersion"]
                        self._dirty.put((meta["namespace"], meta["name"]))
                        if self._stop.is_set():
                            return
            except OSError as exc:
                log.debug("stand-in watch interrupted: %s", exc)
                time.sleep(0.1)

    def _control(self) -> None:
        while not self._stop.is_set():
            keys = set(self.runs)
            try:
                keys.add(self._dirty.get(timeout=self.tick_s))
                while True:
                    keys.add(self._dirty.get_nowait())
            except queue.Empty:
                pass
            for namespace, name in sorted(keys):
                try:
                    self.reconcile(namespace, name)
                except ApiError as exc:
                    log.debug("stand-in reconcile of %s/%s: %s", namespace, name, exc)

    # ----- the state machine ---------------------------------------------------------------
    def _patch_status(self, rayjob: Obj, status: Obj) -> None:
        meta = rayjob["metadata"]
        path = object_path("ray.io/v1", "RayJob", meta["namespace"], meta["name"]) + "/status"
        self.api.merge_patch(path, {"status": status})

    def _delete_cluster(self, namespace: str, run: _Run | None) -> None:
        if run is None:
            return
        run.cancel.set()
        try:
            self.api.request("DELETE", object_path("ray.io/v1", "RayCluster", namespace, run.cluster))
        except ApiError as exc:
            if exc.status != 404:
                raise

    def _create_cluster(self, rayjob: Obj, name: str) -> _Run:
        meta = rayjob["metadata"]
        labels = {**(meta.get("labels") or {}), "ray.io/originated-from-crd": "RayJob",
                  "ray.io/originated-from-cr-name": meta["name"]}
        owner = {"apiVersion": "ray.io/v1", "kind": "RayJob", "name": meta["name"], "uid": meta["uid"],
                 "controller": True, "blockOwnerDeletion": True}
        self.api.create({"apiVersion": "ray.io/v1", "kind": "RayCluster",
                         "metadata": {"name": name, "namespace": meta["namespace"], "labels": labels,
                                      "ownerReferences": [owner]},
                         "spec": rayjob["spec"].get("rayClusterSpec", {})})
        return _Run(cluster=name, ready_at=time.monotonic() + self.cluster_ready_after_s)

    def _configmap(self, rayjob: Obj) -> Obj | None:
        pod = rayjob["spec"].get("rayClusterSpec", {}).get("headGroupSpec", {}).get("template", {})
        for volume in pod.get("spec", {}).get("volumes", []):
            if "configMap" in volume:
                namespace = rayjob["metadata"]["namespace"]
                return self.api.get(object_path("v1", "ConfigMap", namespace, volume["configMap"]["name"]))
        return None

    def _start_runner(self, rayjob: Obj, run: _Run) -> None:
        configmap = self._configmap(rayjob)

        def target() -> None:
            try:
                run.returncode = self.runner(rayjob, configmap, run.cancel)
            except Exception:
                log.exception("stand-in runner crashed")
                run.returncode = 1

        thread_name = f"standin-run-{rayjob['metadata']['name']}"
        run.thread = threading.Thread(target=target, name=thread_name, daemon=True)
        run.thread.start()

    def _mark_cluster_ready(self, namespace: str, run: _Run) -> None:
        path = object_path("ray.io/v1", "RayCluster", namespace, run.cluster)
        cluster = self.api.get(path)
        if cluster is None:
            return
        conditions = [{"type": t, "status": "True", "reason": t, "lastTransitionTime": _now()}
                      for t in ("HeadPodReady", "RayClusterProvisioned")]
        self.api.merge_patch(path + "/status", {"status": {
            "state": "ready", "conditions": conditions, "readyWorkerReplicas": sum(
                g.get("replicas", 0) for g in cluster["spec"].get("workerGroupSpecs", [])),
            "observedGeneration": cluster["metadata"].get("generation", 1)}})

    def _deadline_passed(self, spec: Obj, status: Obj) -> bool:
        deadline = spec.get("activeDeadlineSeconds")
        started = status.get("startTime")
        return deadline is not None and started is not None and time.time() >= _epoch(started) + deadline

    def _ttl_passed(self, spec: Obj, status: Obj) -> bool:
        ended = status.get("endTime")
        return ended is not None and time.time() >= _epoch(ended) + spec.get("ttlSecondsAfterFinished", 0)

    def _finish(self, rayjob: Obj, run: _Run) -> None:
        """Running → Complete, or Failed and then Retrying while the backoff limit allows."""
        spec, status = rayjob["spec"], rayjob.get("status") or {}
        failed = status.get("failed", 0)
        if run.returncode == 0:
            self._patch_status(rayjob, {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED",
                                        "endTime": _now(), "succeeded": 1})
        elif failed < spec.get("backoffLimit", 0):
            self._patch_status(rayjob, {"jobDeploymentStatus": "Retrying", "failed": failed + 1,
                                        "jobStatus": "FAILED", "reason": "AppFailed"})
        else:
            self._patch_status(rayjob, {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED",
                                        "reason": "AppFailed", "endTime": _now(), "failed": failed + 1,
                                        "message": f"the driver exited with code {run.returncode}"})

    def reconcile(self, namespace: str, name: str) -> None:
        """One pass of KubeRay 1.7's RayJob state machine ("" is its New)."""
        key = (namespace, name)
        rayjob = self.api.get(object_path("ray.io/v1", "RayJob", namespace, name))
        run = self.runs.get(key)
        if rayjob is None:
            if run is not None:
                run.cancel.set()
                del self.runs[key]
            return
        spec, status = rayjob.get("spec") or {}, rayjob.get("status") or {}
        state = status.get("jobDeploymentStatus") or ""
        if state in ("Complete", "Failed"):
            # shutdownAfterJobFinishes: the RayCluster (not the RayJob) goes ttlSecondsAfterFinished later.
            if run is not None and spec.get("shutdownAfterJobFinishes") and self._ttl_passed(spec, status):
                self._delete_cluster(namespace, self.runs.pop(key))
            return
        if state == "":  # New: name the cluster and the Ray job first, and start the deadline's clock
            self._patch_status(rayjob, {
                "jobDeploymentStatus": "Initializing", "rayClusterName": f"{name}-{secrets.token_hex(3)[:5]}",
                "jobId": f"{name}-{secrets.token_hex(4)}", "jobStatus": "", "startTime": _now()})
            return
        if state == "Suspended":
            if not spec.get("suspend"):
                self._patch_status(rayjob, {"jobDeploymentStatus": "", "jobStatus": ""})
            return
        if state in ("Suspending", "Retrying"):
            # Every pod of the cluster is deleted at once (the runner's cancel); the status moves on once
            # the RayCluster object is gone, not its pods, which may still be in their grace period.
            self._delete_cluster(namespace, self.runs.pop(key, None))
            cluster = status.get("rayClusterName") or "-"
            if self.api.get(object_path("ray.io/v1", "RayCluster", namespace, cluster)) is not None:
                return
            self._patch_status(rayjob, {
                "jobDeploymentStatus": "Suspended" if state == "Suspending" else "", "jobStatus": "",
                "rayClusterName": "", "dashboardURL": "", "jobId": "", "message": "", "reason": ""})
            return
        if spec.get("suspend"):  # only Initializing and Running may suspend
            self._patch_status(rayjob, {"jobDeploymentStatus": "Suspending"})
            return
        if self._deadline_passed(spec, status):  # Failed, never retried; the cluster lives until the TTL
            self._patch_status(rayjob, {
                "jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded", "endTime": _now(),
                "failed": status.get("failed", 0) + 1,
                "message": f"The RayJob has passed activeDeadlineSeconds ({spec['activeDeadlineSeconds']}s)"})
            return
        if state == "Initializing":
            if run is None:
                run = self.runs[key] = self._create_cluster(rayjob, status["rayClusterName"])
            if time.monotonic() >= run.ready_at:
                self._mark_cluster_ready(namespace, run)
                self._patch_status(rayjob, {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING",
                                            "dashboardURL": f"{run.cluster}-head-svc.{namespace}.svc:8265"})
                self._start_runner(rayjob, run)
            return
        if state == "Running" and run is not None and run.returncode is not None:
            self._finish(rayjob, run)
