"""Fixtures for operator tests: the API emulator, CRDs installed, kopf and the KubeRay stand-in.

kopf runs in its own thread and event loop (started and stopped inside each test), with a
fresh registry per run, so no test sees another's handlers or tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kopf
import pytest
from kuberay_schema import load_kuberay_crd

from kuberlhf import crd
from kuberlhf_operator.handlers import build_registry, make_settings
from kuberlhf_operator.kubeapi import KubeApi
from kuberlhf_operator.metrics import Metrics
from tests.emulator import EmulatorHandle, running_emulator, write_kubeconfig
from tests.emulator.kuberay_standin import STANDIN_USER, KubeRayStandIn, Runner

OPERATOR_USER = "system:serviceaccount:kuberlhf-system:kuberlhf-operator"


@functools.cache
def _kuberay_crd_text() -> str:
    return json.dumps([load_kuberay_crd("RayJob"), load_kuberay_crd("RayCluster")])


def kuberay_crds() -> list[dict[str, Any]]:
    """The real KubeRay v1.7.0 RayJob and RayCluster CRDs, read once (kuberay_schema finds them)."""
    return json.loads(_kuberay_crd_text())  # type: ignore[no-any-return]


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Polls until `predicate` holds. The default is generous on purpose: these tests check states,
    not speed, and under `make test` the operator shares two cores with training runs (a suspend
    round trip through the operator and the KubeRay stand-in once took over 10 s in CI)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[EmulatorHandle]:
    with running_emulator(tmp_path) as handle:
        yield handle


@pytest.fixture
def admin(emulator: EmulatorHandle) -> KubeApi:
    return KubeApi.from_environment(str(emulator.kubeconfig))


def install_crds(handle: EmulatorHandle) -> None:
    for definition in [crd.build_crd(), *kuberay_crds()]:
        handle.create(definition)


@pytest.fixture
def cluster(emulator: EmulatorHandle) -> EmulatorHandle:
    """An emulator with the RLHFJob and KubeRay CRDs installed (every identity may do anything)."""
    install_crds(emulator)
    return emulator


@pytest.fixture
def secured_cluster(emulator: EmulatorHandle) -> EmulatorHandle:
    """Like `cluster`, but RBAC is enforced for every identity except admin and the KubeRay stand-in."""
    install_crds(emulator)
    emulator.call(lambda: setattr(emulator.emulator, "authorize", True))
    return emulator


def user_api(handle: EmulatorHandle, user: str) -> tuple[KubeApi, Path]:
    token = handle.add_token(user)
    path = write_kubeconfig(handle.tmp / f"kubeconfig-{user.replace(':', '-')}", handle.url, token)
    return KubeApi.from_environment(str(path)), path


@contextlib.contextmanager
def running_operator(handle: EmulatorHandle, namespaces: list[str] | None = None) -> Iterator[Metrics]:
    """kopf with the project's handlers in a thread, authenticated as the operator's ServiceAccount."""
    api, _ = user_api(handle, OPERATOR_USER)
    metrics = Metrics()
    registry = build_registry(api, metrics)
    stop, ready = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def main() -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(kopf.operator(
                registry=registry, settings=make_settings(), standalone=True,
                clusterwide=not namespaces, namespaces=namespaces or (), stop_flag=stop, ready_flag=ready))
        except BaseException as exc:
            errors.append(exc)
        finally:
            loop.close()

    thread = threading.Thread(target=main, name="kopf", daemon=True)
    thread.start()
    if not ready.wait(timeout=15):
        raise AssertionError(f"kopf did not start: {errors}")
    try:
        yield metrics
    finally:
        stop.set()
        thread.join(timeout=15)
    assert not thread.is_alive(), "kopf did not stop"
    assert not errors, f"kopf failed: {errors}"


@contextlib.contextmanager
def running_standin(handle: EmulatorHandle, runner: Runner | None = None) -> Iterator[KubeRayStandIn]:
    api, _ = user_api(handle, STANDIN_USER)
    token = handle.add_token(STANDIN_USER)
    with KubeRayStandIn(api, handle.url, token, runner=runner) as standin:
        yield standin
