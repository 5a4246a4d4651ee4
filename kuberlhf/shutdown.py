"""Stopping a run when its pods are deleted: a small file protocol on the checkpoint volume.

KubeRay deletes every pod of a RayJob at once (suspend, retry, deletion; preemption and
`kubectl delete pod` delete pods too), and Kubernetes then SIGTERMs each pod's main process.
In a Ray pod that is `ray start --block`, which stops the node and kills the actors on it, so a
driver that merely catches SIGTERM would find its trainers gone before it could save (and in a
RayJob the driver is not a pod's main process at all). What Kubernetes does guarantee is that a
container's preStop hook runs to completion *before* its SIGTERM, within the pod's
terminationGracePeriodSeconds. So every Ray pod's preStop runs `kuberlhf wait-saved`: it asks the
driver to stop and holds its pod (the node, the actors on it) until the driver has published its
checkpoint. Every pod mounts the checkpoint volume, so the run's output folder is where they meet:

    stop-requested   written by a terminating pod's hook: finish the step, save, stop
    running          the driver holds this while it trains; removed once its checkpoint is published
    stopped          the driver's last word (JSON: the checkpoint it published)
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

STOP_REQUESTED, RUNNING, STOPPED = "stop-requested", "running", "stopped"
# What a pod keeps of its grace period after the hook, for `ray start --block` to stop its node
# on SIGTERM before kubelet's SIGKILL.
HOOK_MARGIN_S = 10


def hook_timeout_s(grace_s: int) -> int:
    """How long a pod's preStop hook may wait for the driver within the pod's grace period."""
    return max(grace_s - HOOK_MARGIN_S, 0)


def _write(path: Path, text: str) -> None:
    """Write then rename, so a reader on another pod never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(text)
    partial.replace(path)


def request_stop(output: Path) -> None:
    _write(output / STOP_REQUESTED, json.dumps({"at": time.time(), "host": os.uname().nodename}) + "\n")


def wait_saved(output: Path, timeout_s: float, poll_s: float = 0.5) -> bool:
    """The preStop hook: ask the driver to stop, then wait until it has saved (or none is running).
    False when the timeout came first; the pod then goes anyway, which Kubernetes would do too."""
    request_stop(output)
    deadline = time.monotonic() + timeout_s
    while (output / RUNNING).exists():
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
    return True


class RunLease:
    """The driver's side: `running` while it trains, a watch on `stop-requested`, `stopped` at the end.

    KubeRay reports a RayJob Suspended once its RayCluster object is gone, while the old pods may still
    be in their preStop hooks, so a resumed run can start while the previous driver is still saving.
    `acquire` therefore waits for such a driver first: one that a pod asked to stop and that still
    holds `running`, for at most `grace_s` after the request (by then kubelet has killed its pods).
    """

    def __init__(self, output: Path, grace_s: float, on_stop_requested: Callable[[], None],
                 poll_s: float = 0.5) -> None:
        self.output, self.grace_s, self.poll_s = output, grace_s, poll_s
        self.on_stop_requested = on_stop_requested
        self._done = threading.Event()
        self._watch: threading.Thread | None = None

    def previous_driver_deadline(self) -> float | None:
        """Until when (time.time()) a previous driver that was asked to stop may still be saving."""
        requested = self.output / STOP_REQUESTED
        try:
            if not (self.output / RUNNING).exists():
                return None
            deadline = requested.stat().st_mtime + self.grace_s
        except FileNotFoundError:
            return None
        return deadline if deadline > time.time() else None

    def acquire(self) -> None:
        while (deadline := self.previous_driver_deadline()) is not None:
            time.sleep(min(self.poll_s, max(deadline - time.time(), 0.0)))
        for name in (STOP_REQUESTED, STOPPED):
            (self.output / name).unlink(missing_ok=True)
        _write(self.output / RUNNING, json.dumps({"pid": os.getpid(), "host": os.uname().nodename}) + "\n")
        self._watch = threading.Thread(target=self._watch_requests, name="stop-requests", daemon=True)
        self._watch.start()

    def _watch_requests(self) -> None:
        while not self._done.wait(self.poll_s):
            if (self.output / STOP_REQUESTED).exists():
                self.on_stop_requested()
                return

    def release(self, checkpoint: str | None) -> None:
        """Publish `stopped`, then drop `running` (what the hooks wait for); idempotent, and a no-op
        before `acquire` (the `running` there may be another driver's)."""
        if self._watch is None or self._done.is_set():
            return
        self._done.set()
        _write(self.output / STOPPED, json.dumps({"checkpoint": checkpoint, "at": time.time()}) + "\n")
        (self.output / RUNNING).unlink(missing_ok=True)
