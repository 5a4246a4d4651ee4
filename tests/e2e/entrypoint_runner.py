"""A KubeRay stand-in runner that runs a RayJob's entrypoint for real, as the head pod would.

KubeRay would start the RayCluster's pods and submit `spec.entrypoint` to the head. Here no
pods exist, so the head pod is played by a local process group built from the RayJob itself:
- its volumes become folders: the ConfigMap volume is written out file by file (the spec at
  "/etc/kuberlhf/rlhfjob.yaml"), a PersistentVolumeClaim becomes one folder per claim that
  outlives restarts of the job (like the real volume); paths in the entrypoint are mapped;
- its container env is set as written in the pod template, plus KUBECONFIG with a token of the
  pod's ServiceAccount (what kubelet would project into the pod) and PYTHONPATH=<repo>/examples
  (the worker image ships examples/ on its PYTHONPATH, so rewards/digits.py resolves there);
- `--ray-address auto` becomes `--ray-address local`: a private local Ray stands in for the
  cluster's head and worker pods (the same custom resources are declared on it).
On `cancel` (suspend or deletion) the entrypoint gets SIGTERM, as Kubernetes sends to a pod's
main process, then its whole process group SIGKILL after the grace period; every process that
inherited the pod's marker is killed when the "pod" ends, so no Ray process outlives it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Obj = dict[str, Any]
MARKER_ENV = "KUBERLHF_E2E_POD"
REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"


@dataclass(frozen=True)
class HeadPod:
    """The parts of the RayJob's head pod template that decide how the entrypoint runs."""

    service_account: str
    env: dict[str, str]
    mounts: dict[str, Obj]  # mountPath → the volume mounted there


def head_pod(rayjob: Obj) -> HeadPod:
    template = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    container = template["containers"][0]
    volumes = {v["name"]: v for v in template.get("volumes", [])}
    return HeadPod(
        service_account=template.get("serviceAccountName", "default"),
        env={e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e},
        mounts={m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])},
    )


def map_path(arg: str, mapping: dict[str, Path]) -> str:
    """The host path of a pod path under one of the mapped mount points (others unchanged)."""
    for mount, host in sorted(mapping.items(), key=lambda kv: -len(kv[0])):
        if arg == mount or arg.startswith(mount.rstrip("/") + "/"):
            return str(host / arg[len(mount):].lstrip("/"))
    return arg


def local_argv(entrypoint: str, mapping: dict[str, Path]) -> list[str]:
    """The entrypoint as a local command: mounted paths mapped, Ray started privately."""
    argv = [map_path(arg, mapping) for arg in shlex.split(entrypoint)]
    if "--ray-address" in argv:
        argv[argv.index("--ray-address") + 1] = "local"
    return argv


@dataclass
class Attempt:
    """One run of one RayJob's entrypoint (a fresh 'head pod')."""

    rayjob: str
    service_account: str
    argv: list[str]
    log: Path
    marker: str
    returncode: int | None = None
    terminated: bool = False


@dataclass
class EntrypointRunner:
    """runner(rayjob, configmap, cancel) -> returncode, for KubeRayStandIn."""

    workdir: Path
    credentials: Callable[[str, str], Path]  # (namespace, service account) → kubeconfig path
    extra_env: dict[str, str] = field(default_factory=dict)
    grace_s: float = 60.0
    attempts: list[Attempt] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def volume_dir(self, namespace: str, claim: str) -> Path:
        return self.workdir / "volumes" / namespace / claim

    def _mount(self, volume: Obj, namespace: str, configmap: Obj | None, pod_dir: Path) -> Path | None:
        if "persistentVolumeClaim" in volume:
            path = self.volume_dir(namespace, volume["persistentVolumeClaim"]["claimName"])
        elif "configMap" in volume:
            if configmap is None or configmap["metadata"]["name"] != volume["configMap"]["name"]:
                raise RuntimeError(f"ConfigMap {volume['configMap']['name']} not found: the pod cannot start")
            path = pod_dir / volume["name"]
            path.mkdir(parents=True, exist_ok=True)
            for key, text in (configmap.get("data") or {}).items():
                (path / key).write_text(text)
        else:
            return None
        path.mkdir(parents=True, exist_ok=True)
        return path

    def __call__(self, rayjob: Obj, configmap: Obj | None, cancel: threading.Event) -> int:
        meta = rayjob["metadata"]
        namespace = meta["namespace"]
        pod = head_pod(rayjob)
        with self._lock:
            number = len(self.attempts) + 1
        pod_dir = self.workdir / "pods" / f"{meta['name']}-{number}"
        pod_dir.mkdir(parents=True, exist_ok=True)
        mapping = {path: host for path, volume in pod.mounts.items()
                   if (host := self._mount(volume, namespace, configmap, pod_dir)) is not None}
        marker = secrets.token_hex(8)
        env = {
            **os.environ, **pod.env, **self.extra_env,
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(REPO / "examples"),
            "KUBECONFIG": str(self.credentials(namespace, pod.service_account)),
            MARKER_ENV: marker,
        }
        argv = local_argv(rayjob["spec"]["entrypoint"], mapping)
        attempt = Attempt(meta["name"], pod.service_account, argv, pod_dir / "log.txt", marker)
        with self._lock:
            self.attempts.append(attempt)
        with attempt.log.open("wb") as log:
            proc = subprocess.Popen(attempt.argv, env=env, cwd=pod_dir, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                while proc.poll() is None:
                    if cancel.wait(0.2):
                        attempt.terminated = True
                        proc.send_signal(signal.SIGTERM)
                        try:
                            proc.wait(timeout=self.grace_s)
                        except subprocess.TimeoutExpired:
                            os.killpg(proc.pid, signal.SIGKILL)
                            proc.wait(timeout=10)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
                kill_marked(marker)
        attempt.returncode = proc.returncode
        return proc.returncode

    def wait_idle(self, timeout_s: float) -> None:
        """Wait for every attempt to end (they are cancelled by then); kill what is left after that."""
        deadline = time.monotonic() + timeout_s
        while any(a.returncode is None for a in self.attempts) and time.monotonic() < deadline:
            time.sleep(0.1)
        for attempt in self.attempts:
            kill_marked(attempt.marker)


def marked_processes(marker: str) -> list[int]:
    """Our processes whose environment carries this pod's marker (children inherit it)."""
    needle = f"{MARKER_ENV}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def kill_marked(marker: str, timeout_s: float = 10.0) -> list[int]:
    """SIGKILL what is left of one pod (Ray's raylet, GCS and workers included); the pids killed."""
    killed = marked_processes(marker)
    for pid in killed:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while marked_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    return killed
