"""TEST STAND-IN for the KubeRay controller (not KubeRay): moves RayJobs through KubeRay's states.

No KubeRay can run here (no cluster, no pods), so this small controller plays its part
against the API emulator, through the API like the real one: it watches RayJobs, creates
the RayCluster `<rayjob>-<5 chars>` owned by the RayJob (labels copied, as KubeRay does),
marks it ready (state ready + HeadPodReady / RayClusterProvisioned), and walks
jobDeploymentStatus Initializing → Running → Complete / Failed, with Retrying up to
spec.backoffLimit and Suspending → Suspended (cluster deleted) when spec.suspend is set.

What "runs the entrypoint" is pluggable: `runner(rayjob, configmap, cancel) -> returncode`
runs in its own thread; `cancel` (a threading.Event) is set on suspend or deletion. The
default runner just waits `job_duration_s` and returns 0.
"""

from __future__ import annotations

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

    def _create_cluster(self, rayjob: Obj) -> _Run:
        meta = rayjob["metadata"]
        name = f"{meta['name']}-{secrets.token_hex(3)[:5]}"
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

    def reconcile(self, namespace: str, name: str) -> None:
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
            return
        if spec.get("suspend"):
            if state in ("", "Suspended"):
                if state == "":
                    self._patch_status(rayjob, {"jobDeploymentStatus": "Suspended"})
                return
            if state != "Suspending":
                self._patch_status(rayjob, {"jobDeploymentStatus": "Suspending"})
                return
            self._delete_cluster(namespace, self.runs.pop(key, None))
            self._patch_status(rayjob, {"jobDeploymentStatus": "Suspended", "jobStatus": "STOPPED",
                                        "rayClusterName": None})
            return
        if state in ("", "Suspended", "Retrying") or run is None:
            if run is not None:
                self._delete_cluster(namespace, self.runs.pop(key))
            run = self.runs[key] = self._create_cluster(rayjob)
            self._patch_status(rayjob, {"jobDeploymentStatus": "Initializing", "rayClusterName": run.cluster,
                                        "jobId": f"{name}-{secrets.token_hex(4)}", "jobStatus": None,
                                        "startTime": status.get("startTime") or _now(),
                                        "dashboardURL": f"{run.cluster}-head-svc.{namespace}.svc:8265"})
            return
        if state == "Initializing":
            if time.monotonic() >= run.ready_at:
                self._mark_cluster_ready(namespace, run)
                self._patch_status(rayjob, {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"})
                self._start_runner(rayjob, run)
            return
        if state == "Running" and run.returncode is not None:
            failed = status.get("failed", 0)
            if run.returncode == 0:
                self._patch_status(rayjob, {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED",
                                            "endTime": _now(), "succeeded": 1})
            elif failed < spec.get("backoffLimit", 0):
                self._patch_status(rayjob, {"jobDeploymentStatus": "Retrying", "failed": failed + 1})
            else:
                self._patch_status(rayjob, {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED",
                                            "endTime": _now(), "failed": failed + 1,
                                            "message": f"the driver exited with code {run.returncode}"})
            if run.returncode == 0 or failed >= spec.get("backoffLimit", 0):
                self.runs.pop(key, None)
