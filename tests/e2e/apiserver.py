"""`python -m tests.e2e.apiserver`: the API emulator as a process, over TLS, with RBAC for everyone.

`python -m tests.emulator` serves the emulator over plain http, and the real kubectl never sends
a bearer token over http: with RBAC enforced it would be an anonymous user. So this process
serves the same emulator (tests/emulator/server.py) the way a real API server is reached:
- over HTTPS with a throwaway self-signed certificate for 127.0.0.1 (--ca-file, made with the
  openssl CLI), so kubectl, kopf and the kubernetes client all present their tokens;
- RBAC enforced for every identity except the admin and the KubeRay stand-in;
- accepting the tokens the test appends to --tokens (JSON lines {"token", "user"}) at any time,
  as a real cluster accepts a ServiceAccount's tokens (kubelet gets them through TokenRequest);
- writing every request it served to --audit-log (JSON lines) when it stops (SIGTERM / SIGINT).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import signal
import ssl
import subprocess
from pathlib import Path
from typing import Any

import aiohttp.web
import yaml

from tests.emulator.server import ApiServerEmulator

TOKEN_POLL_S = 0.05


def kubeconfig(url: str, token: str, ca_file: Path, namespace: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Config", "current-context": "e2e",
        "clusters": [{"name": "e2e", "cluster": {"server": url, "certificate-authority": str(ca_file)}}],
        "users": [{"name": "e2e", "user": {"token": token}}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "e2e", "namespace": namespace}}],
    }


def write_kubeconfig(path: Path, url: str, token: str, ca_file: Path, namespace: str = "default") -> Path:
    path.write_text(yaml.safe_dump(kubeconfig(url, token, ca_file, namespace)))
    return path


def read_tokens(path: Path) -> dict[str, str]:
    """token → user from the tokens file; a half-written last line is left for the next read."""
    tokens: dict[str, str] = {}
    if not path.exists():
        return tokens
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        tokens[entry["token"]] = entry["user"]
    return tokens


def make_certificate(cert: Path, key: Path) -> None:
    """A self-signed certificate valid for 127.0.0.1 (it is its own CA)."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=kuberlhf-e2e-apiserver",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)


async def serve(args: argparse.Namespace) -> list[dict[str, Any]]:
    key = args.ca_file.with_suffix(".key")
    make_certificate(args.ca_file, key)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(args.ca_file, key)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    emulator = ApiServerEmulator(authorize=True)
    async with emulator:
        runner = aiohttp.web.ServerRunner(aiohttp.web.Server(emulator), handle_signals=False,
                                          shutdown_timeout=0.5)
        await runner.setup()
        site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
        await site.start()
        url = f"https://127.0.0.1:{runner.addresses[0][1]}"
        write_kubeconfig(args.kubeconfig, url, emulator.admin_token, args.ca_file)
        print(url, flush=True)
        while not stop.is_set():
            emulator.tokens.update(read_tokens(args.tokens))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), TOKEN_POLL_S)
        await runner.cleanup()
        return [dataclasses.asdict(request) for request in emulator.log]


def main() -> int:
    parser = argparse.ArgumentParser(description="The API emulator over TLS, RBAC enforced, external tokens.")
    parser.add_argument("--kubeconfig", type=Path, required=True, help="write the admin kubeconfig here")
    parser.add_argument("--ca-file", type=Path, required=True, help="write the server certificate here")
    parser.add_argument("--tokens", type=Path, required=True, help="JSON lines {token, user} to accept")
    parser.add_argument("--audit-log", type=Path, required=True, help="JSON lines of requests, on exit")
    args = parser.parse_args()
    requests = asyncio.run(serve(args))
    with args.audit_log.open("w") as log:
        for request in requests:
            log.write(json.dumps(request) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
