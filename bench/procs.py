"""Child processes measured from outside: pinned to cores, their process tree's RSS sampled.

Used by bench/vs_trl.py for every system it compares, so each is started, watched and stopped
the same way. Runs under .venv-bench (psutil lives there).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

POLL_S = 0.2
# A core counts as free below this share busy: the bench's own polling and the idle system.
QUIET_BUSY_PERCENT = 15.0


def wait_quiet(cpus: str | None, timeout_s: float = 60.0) -> float:
    """Wait until the cores the next run is pinned to are idle; seconds waited. A run's stragglers
    (Ray's raylet and workers, TRL's dataloader threads) can outlive its exit by seconds, and
    whatever runs next would otherwise pay for them."""
    cores = parse_cpus(cpus) if cpus else None
    started = time.time()
    while time.time() - started < timeout_s:
        busy = psutil.cpu_percent(interval=1.0, percpu=True)
        watched = [busy[c] for c in cores if c < len(busy)] if cores else busy
        if max(watched, default=0.0) < QUIET_BUSY_PERCENT:
            break
    else:
        print(f"cores {cpus or 'all'} still busy after {timeout_s:.0f} s; measuring anyway", file=sys.stderr)
    return time.time() - started


def tree_rss(process: psutil.Process) -> int:
    """RSS of a process and all its descendants (Ray's GCS, raylet and workers included)."""
    total = 0
    try:
        members = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for member in members:
        try:
            total += member.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def stop_tree(process: psutil.Process, grace_s: float = 30) -> None:
    """Stop a child that is still running (timeout, Ctrl-C) and every process it started: SIGTERM
    first (kuberlhf then shuts its private Ray down), SIGKILL for whatever is left after grace_s."""
    try:
        members = [process, *process.children(recursive=True)]
        process.terminate()
    except psutil.NoSuchProcess:
        return
    _, alive = psutil.wait_procs(members, timeout=grace_s)
    for member in alive:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            continue


class LineWatcher:
    """Notes the wall-clock time each new line of a file is first seen (to POLL_S)."""

    def __init__(self, path: Path):
        self.path = path
        self.arrivals: list[float] = []

    def __call__(self) -> None:
        if not self.path.exists():
            return
        now = time.time()
        with self.path.open() as fh:
            complete = sum(1 for line in fh if line.endswith("\n"))
        self.arrivals.extend([now] * (complete - len(self.arrivals)))


def run_measured(
    command: list[str], env: dict[str, str], log: Path, timeout_s: float, on_poll: Callable[[], None],
    cwd: Path | None = None,
) -> dict[str, Any]:
    """Start `command`, sample its tree's RSS and call `on_poll` every POLL_S until it exits."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        started = time.time()
        child = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
        process = psutil.Process(child.pid)
        peak = 0
        try:
            while child.poll() is None:
                peak = max(peak, tree_rss(process))
                on_poll()
                if time.time() - started > timeout_s:
                    print(
                        f"{command[0]}: still running after {timeout_s:.0f} s; stopping it", file=sys.stderr
                    )
                    break
                time.sleep(POLL_S)
        finally:
            if child.poll() is None:
                stop_tree(process)
        rc = child.wait()
        ended = time.time()
    on_poll()
    return {"rc": rc, "started": started, "wall_s": ended - started, "peak_rss_bytes": peak}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pinned(command: list[str], cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus, *command] if cpus else command


def parse_cpus(text: str) -> list[int]:
    """taskset's list syntax ("0-1", "0,2,4-5") as core numbers."""
    cores: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        cores.extend(range(int(low), int(high or low) + 1))
    return cores


def threads_for(cpus: str | None) -> int:
    """Torch threads per system: one per pinned core."""
    return len(parse_cpus(cpus) if cpus else psutil.Process().cpu_affinity())
