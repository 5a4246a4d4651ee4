"""A KubeRay stand-in runner that runs a RayJob's entrypoint for real, as the head pod would.

KubeRay would start the RayCluster's pods and submit `spec.entrypoint` to the head. Here no
pods exist, so the head pod is played by a local process group built from the RayJob itself:
- its volumes become folders: the ConfigMap volume is written out file by file (the spec at
  "/etc/kuberlhf/rlhfjob.yaml"), a PersistentVolumeClaim becomes one folder per claim that
  outlives restarts of the job (like the real volume); paths in the entrypoint are mapped;
- its container env is set as written in the pod template, plus KUBECONFIG with a token of the
  pod's ServiceAccount (what kubelet would project into the pod) and PYTHONPATH: <repo>/examples
  (the worker image ships examples/ on its PYTHONPATH, so rewards/digits.py resolves there), then
  this checkout's packages, so the run is this checkout's code whatever the venv's editable
  install points at (CHECKOUT_PYTHONPATH);
- `--ray-address auto` becomes `--ray-address local`: a private local Ray stands in for the
  cluster's head and worker pods (the same custom resources are declared on it).
On `cancel` the pods are deleted as KubeRay deletes them, all at once, and terminated as kubelet
does (`terminate`): every pod's preStop hook runs first (each pod of the RayJob, head and worker
replicas, with the paths mapped), bounded by the pod's terminationGracePeriodSeconds; then every
process of the "pod" (the driver, the local Ray's raylet, GCS and workers: what the cluster's
pods run) gets SIGTERM at the same moment, and SIGKILL once the grace period is over. Every
process that inherited the pod's marker is killed when the "pod" ends, so no Ray process outlives it.
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
CHECKOUT_PYTHONPATH = os.pathsep.join(str(REPO / part) for part in ("", "operator", "workers"))
DEFAULT_GRACE_S = 30  # Kubernetes' terminationGracePeriodSeconds when a pod sets none
KUBELET_EXTRA_GRACE_S = 2  # what kubelet adds once when a preStop hook outlasts the grace period


@dataclass(frozen=True)
class HeadPod:
    """The parts of the RayJob's head pod template that decide how the entrypoint runs."""

    service_account: str
    env: dict[str, str]
    mounts: dict[str, Obj]  # mountPath → the volume mounted there
    grace_s: int


def head_pod(rayjob: Obj) -> HeadPod:
    template = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    container = template["containers"][0]
    volumes = {v["name"]: v for v in template.get("volumes", [])}
    return HeadPod(
        service_account=template.get("serviceAccountName", "default"),
        env={e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e},
        mounts={m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])},
        grace_s=int(template.get("terminationGracePeriodSeconds", DEFAULT_GRACE_S)),
    )


def pre_stop_hooks(rayjob: Obj) -> list[list[str]]:
    """The preStop exec command of every pod of the RayCluster: the head and each worker replica."""
    cluster = rayjob["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]]
    for group in cluster.get("workerGroupSpecs", []):
        pods += [group["template"]] * int(group.get("replicas", 1))
    hooks = [((pod["spec"]["containers"][0].get("lifecycle") or {}).get("preStop") or {}).get("exec")
             for pod in pods]
    return [list(hook["command"]) for hook in hooks if hook]


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
    grace_s: int
    returncode: int | None = None
    terminated: bool = False
    # What the termination did, for the tests: the pids alive when the pods were deleted, the hooks'
    # exit codes, the pids signalled at once, and seconds from deletion to the SIGTERM and to the end.
    alive_at_deletion: list[int] = field(default_factory=list)
    hook_returncodes: list[int] = field(default_factory=list)
    sigterm_pids: list[int] = field(default_factory=list)
    sigterm_after_s: float | None = None
    ended_after_s: float | None = None


@dataclass
class EntrypointRunner:
    """runner(rayjob, configmap, cancel) -> returncode, for KubeRayStandIn."""

    workdir: Path
    credentials: Callable[[str, str], Path]  # (namespace, service account) → kubeconfig path
    extra_env: dict[str, str] = field(default_factory=dict)
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
            "PYTHONPATH": os.pathsep.join([str(REPO / "examples"), CHECKOUT_PYTHONPATH]),
            "KUBECONFIG": str(self.credentials(namespace, pod.service_account)),
            MARKER_ENV: marker,
        }
        argv = local_argv(rayjob["spec"]["entrypoint"], mapping)
        attempt = Attempt(meta["name"], pod.service_account, argv, pod_dir / "log.txt", marker, pod.grace_s)
        hooks = [local_argv(shlex.join(hook), mapping) for hook in pre_stop_hooks(rayjob)]
        with self._lock:
            self.attempts.append(attempt)
        with attempt.log.open("wb") as log:
            proc = subprocess.Popen(attempt.argv, env=env, cwd=pod_dir, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                while proc.poll() is None:
                    if cancel.wait(0.2):
                        terminate(attempt, proc, hooks, env, pod_dir)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
                kill_marked(marker)
        attempt.returncode = proc.returncode
        return proc.returncode

    @property
    def grace_s(self) -> int:
        """The longest grace period of the pods run so far: how long a termination may take."""
        return max((a.grace_s for a in self.attempts), default=DEFAULT_GRACE_S)

    def wait_idle(self, timeout_s: float) -> None:
        """Wait for every attempt to end (they are cancelled by then); kill what is left after that."""
        deadline = time.monotonic() + timeout_s
        while any(a.returncode is None for a in self.attempts) and time.monotonic() < deadline:
            time.sleep(0.1)
        for attempt in self.attempts:
            kill_marked(attempt.marker)


def terminate(attempt: Attempt, proc: subprocess.Popen[bytes], hooks: list[list[str]], env: dict[str, str],
              pod_dir: Path) -> None:
    """Delete the pods as kubelet terminates them: the preStop hooks (run in the pods' environment, all
    at once as every pod is deleted at once) to completion or the grace period (+2 s), then SIGTERM to
    every process of the pods at the same moment, then SIGKILL when the grace period is over."""
    started = time.monotonic()
    deadline = started + attempt.grace_s
    attempt.terminated = True
    attempt.alive_at_deletion = marked_processes(attempt.marker)
    with (pod_dir / "prestop.txt").open("ab") as log:
        running = [subprocess.Popen(hook, env=env, cwd=pod_dir, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True) for hook in hooks]
        for hook in running:
            try:
                hook.wait(timeout=max(deadline + KUBELET_EXTRA_GRACE_S - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                os.killpg(hook.pid, signal.SIGKILL)
                hook.wait(timeout=10)
            attempt.hook_returncodes.append(hook.returncode)
    attempt.sigterm_after_s = time.monotonic() - started
    attempt.sigterm_pids = marked_processes(attempt.marker)
    for pid in attempt.sigterm_pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    try:
        proc.wait(timeout=max(deadline - time.monotonic(), KUBELET_EXTRA_GRACE_S))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    attempt.ended_after_s = time.monotonic() - started


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
