"""A realistic Kubernetes API emulator for tests (kmock subclass), run in a background thread.

`running_emulator()` starts one on 127.0.0.1:<free port>, writes a kubeconfig for it and
yields an `EmulatorHandle`: the URL, the kubeconfig path, the request log, thread-safe
access to stored objects, and helpers to mint ServiceAccount tokens for RBAC tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp.web
import yaml

from tests.emulator.server import ADMIN, ApiServerEmulator, LoggedRequest

__all__ = ["ADMIN", "ApiServerEmulator", "EmulatorHandle", "LoggedRequest", "running_emulator",
           "write_kubeconfig"]

T = TypeVar("T")


def write_kubeconfig(path: Path, url: str, token: str, namespace: str = "default") -> Path:
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": url}}],
        "users": [{"name": "emulator", "user": {"token": token}}],
        "contexts": [{"name": "emulator",
                      "context": {"cluster": "emulator", "user": "emulator", "namespace": namespace}}],
    }
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass
class EmulatorHandle:
    """What tests hold: where the server is, and thread-safe access to its state."""

    url: str
    kubeconfig: Path
    emulator: ApiServerEmulator
    loop: asyncio.AbstractEventLoop
    tmp: Path

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the emulator's loop, so it never races a request being served."""

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=10)

    def get(self, group: str, plural: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        return self.call(lambda: copy.deepcopy(self.emulator.get_object((group, plural), namespace, name)))

    def list(self, group: str, plural: str, namespace: str | None = None) -> list[dict[str, Any]]:
        def pick() -> list[dict[str, Any]]:
            bucket = self.emulator.store.get((group, plural), {})
            return [copy.deepcopy(o) for (ns, _), o in sorted(bucket.items(), key=lambda kv: kv[0][1])
                    if namespace is None or ns == namespace]
        return self.call(pick)

    def requests(self, user: str | None = None) -> list[LoggedRequest]:
        return self.call(lambda: [r for r in self.emulator.log if user is None or r.user == user])

    def add_token(self, user: str, token: str | None = None) -> str:
        token = token or secrets.token_hex(16)
        self.call(lambda: self.emulator.tokens.__setitem__(token, user))
        return token

    def service_account_kubeconfig(self, namespace: str, name: str) -> Path:
        """A kubeconfig that authenticates as system:serviceaccount:<namespace>:<name>."""
        token = self.add_token(f"system:serviceaccount:{namespace}:{name}")
        return write_kubeconfig(self.tmp / f"kubeconfig-{namespace}-{name}", self.url, token, namespace)

    def create(self, obj: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        """Create as a POST would (defaults, 409s, CRD registration), without the HTTP round trip:
        for fixtures that install megabyte-sized objects such as KubeRay's CRDs."""
        group, _, version = obj["apiVersion"].rpartition("/")
        rtype = next(t for t in self.emulator.types.values()
                     if (t.group, t.version, t.kind) == (group, version, obj["kind"]))
        return self.call(lambda: copy.deepcopy(self.emulator._create(rtype, namespace, obj)))

    def create_namespace(self, name: str) -> None:
        body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name},
                "status": {"phase": "Active"}}
        self.call(lambda: self.emulator.put_object(("", "namespaces"), None, body))


@contextlib.contextmanager
def running_emulator(tmp: Path, authorize: bool = False, port: int = 0) -> Iterator[EmulatorHandle]:
    """Serve an emulator from a daemon thread for the duration of the block."""
    ready: dict[str, Any] = {}
    started = threading.Event()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def serve() -> None:
        emulator = ApiServerEmulator(authorize=authorize)
        async with emulator:
            runner = aiohttp.web.ServerRunner(aiohttp.web.Server(emulator), handle_signals=False,
                                              shutdown_timeout=0.5)
            await runner.setup()
            site = aiohttp.web.TCPSite(runner, "127.0.0.1", port)
            await site.start()
            ready.update(emulator=emulator, port=runner.addresses[0][1])
            started.set()
            await stop.wait()
            await runner.cleanup()

    def main() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(serve())
        except BaseException as exc:  # reported to the starting thread below
            ready["error"] = exc
            started.set()
        finally:
            leftovers = asyncio.all_tasks(loop)
            for task in leftovers:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
            loop.close()

    thread = threading.Thread(target=main, name="api-emulator", daemon=True)
    thread.start()
    started.wait(timeout=20)
    if "emulator" not in ready:
        raise RuntimeError(f"the API emulator did not start: {ready.get('error')!r}")
    url = f"http://127.0.0.1:{ready['port']}"
    emulator: ApiServerEmulator = ready["emulator"]
    kubeconfig = write_kubeconfig(tmp / "kubeconfig", url, emulator.admin_token)
    try:
        yield EmulatorHandle(url, kubeconfig, emulator, loop, tmp)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10)
