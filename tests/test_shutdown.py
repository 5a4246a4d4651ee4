"""The stop-file protocol between terminating pods' preStop hooks and the driver."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from kuberlhf import shutdown
from kuberlhf.shutdown import RUNNING, STOP_REQUESTED, STOPPED, RunLease

pytestmark = pytest.mark.unit


def lease(output: Path, grace_s: float = 30.0) -> tuple[RunLease, threading.Event]:
    asked = threading.Event()
    return RunLease(output, grace_s, asked.set, poll_s=0.02), asked


def test_the_hook_returns_at_once_when_no_driver_is_running(tmp_path: Path) -> None:
    started = time.monotonic()
    assert shutdown.wait_saved(tmp_path, timeout_s=5, poll_s=0.02)
    assert time.monotonic() - started < 1
    assert (tmp_path / STOP_REQUESTED).is_file()


def test_the_hook_holds_the_pod_until_the_driver_has_published_its_checkpoint(tmp_path: Path) -> None:
    run, asked = lease(tmp_path)
    run.acquire()

    def driver() -> None:
        assert asked.wait(5), "the driver never saw the hook's stop request"
        time.sleep(0.3)  # finishing the step and saving it
        run.release("checkpoints/step-000003")

    thread = threading.Thread(target=driver)
    thread.start()
    started = time.monotonic()
    assert shutdown.wait_saved(tmp_path, timeout_s=10, poll_s=0.02)
    waited = time.monotonic() - started
    thread.join()
    assert 0.3 <= waited < 5
    assert json.loads((tmp_path / STOPPED).read_text())["checkpoint"] == "checkpoints/step-000003"
    assert not (tmp_path / RUNNING).exists()


def test_the_hook_gives_up_at_its_timeout(tmp_path: Path) -> None:
    run, _ = lease(tmp_path)
    run.acquire()
    started = time.monotonic()
    assert not shutdown.wait_saved(tmp_path, timeout_s=0.3, poll_s=0.02)
    assert 0.3 <= time.monotonic() - started < 2


def test_a_new_run_clears_the_previous_runs_stop_files(tmp_path: Path) -> None:
    (tmp_path / STOP_REQUESTED).write_text("{}")
    (tmp_path / STOPPED).write_text("{}")
    run, asked = lease(tmp_path)
    run.acquire()
    assert not asked.wait(0.2), "a stale request stopped the new run"
    assert not (tmp_path / STOPPED).exists()
    assert json.loads((tmp_path / RUNNING).read_text())["pid"] == os.getpid()
    run.release(None)


def test_a_resumed_run_waits_for_the_previous_driver_still_saving(tmp_path: Path) -> None:
    previous, _ = lease(tmp_path)
    previous.acquire()
    shutdown.request_stop(tmp_path)
    threading.Timer(0.4, previous.release, args=("checkpoints/step-000002",)).start()
    started = time.monotonic()
    resumed, _ = lease(tmp_path)
    resumed.acquire()
    assert time.monotonic() - started >= 0.4
    assert (tmp_path / RUNNING).exists() and not (tmp_path / STOPPED).exists()


def test_a_resumed_run_waits_no_longer_than_the_grace_period_after_the_request(tmp_path: Path) -> None:
    """A driver killed before it released (kubelet's SIGKILL at the grace period) leaves `running`."""
    (tmp_path / RUNNING).write_text("{}")
    shutdown.request_stop(tmp_path)
    started = time.monotonic()
    lease(tmp_path, grace_s=0.4)[0].acquire()
    assert 0.2 <= time.monotonic() - started < 2


def test_a_stale_running_file_without_a_stop_request_does_not_hold_a_new_run(tmp_path: Path) -> None:
    (tmp_path / RUNNING).write_text("{}")
    started = time.monotonic()
    lease(tmp_path)[0].acquire()
    assert time.monotonic() - started < 0.5


def test_release_before_acquire_leaves_another_drivers_files_alone(tmp_path: Path) -> None:
    (tmp_path / RUNNING).write_text("{}")
    lease(tmp_path)[0].release(None)
    assert (tmp_path / RUNNING).exists() and not (tmp_path / STOPPED).exists()


def test_the_hook_timeout_keeps_a_margin_of_the_grace_period() -> None:
    assert [shutdown.hook_timeout_s(grace) for grace in (300, 5, 0)] == [290, 0, 0]
