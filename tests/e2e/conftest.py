"""The end-to-end cluster: the API emulator process, the Helm chart's RBAC, the operator process,
and the KubeRay stand-in (a TEST STAND-IN, not KubeRay) running RayJob entrypoints for real.

Everything that is a process runs in its own process group and is torn down group by group
(SIGTERM, then SIGKILL), whether the test passed or not.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml
from kuberay_schema import kuberay_crd_file

from kuberlhf_operator.kubeapi import KubeApi
from tests.e2e.apiserver import write_kubeconfig
from tests.e2e.entrypoint_runner import CHECKOUT_PYTHONPATH, REPO, VENV_BIN, EntrypointRunner
from tests.emulator.kuberay_standin import STANDIN_USER, KubeRayStandIn
from tests.tools import require_kubectl

CHART_DIR = REPO / "charts" / "kuberlhf"
RELEASE, OPERATOR_NAMESPACE = "kuberlhf", "kuberlhf-system"
# The chart's default, namespaced mode, pointed at the namespace the jobs run in.
CHART_VALUES: dict[str, Any] = {"watchNamespaces": ["default"]}
INSTALLED_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")


def stop_group(proc: subprocess.Popen[Any], grace_s: float = 15.0) -> None:
    """SIGTERM the process group, SIGKILL it if it lingers."""
    if proc.poll() is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Any, timeout_s: float, what: str, every_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


@dataclass
class Cluster:
    """The emulated cluster as its users see it: a URL, an admin kubeconfig and ServiceAccount tokens."""

    url: str
    admin_kubeconfig: Path
    ca_file: Path
    tokens_file: Path
    audit_log: Path
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    def kubectl(self, *args: str, timeout_s: float = 60, check: bool = True) -> str:
        result = subprocess.run([require_kubectl(), "--kubeconfig", str(self.admin_kubeconfig), *args],
                                capture_output=True, text=True, timeout=timeout_s)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result.stdout

    def mint_token(self, user: str) -> str:
        """A bearer token the API server maps to `user`, usable once this returns."""
        token = secrets.token_hex(16)
        with self.tokens_file.open("a") as f:
            f.write(json.dumps({"token": token, "user": user}) + "\n")

        tls = ssl.create_default_context(cafile=self.ca_file)

        def accepted() -> bool:
            request = urllib.request.Request(f"{self.url}/api", headers={"Authorization": f"Bearer {token}"})
            try:
                with urllib.request.urlopen(request, timeout=5, context=tls):
                    return True
            except (urllib.error.URLError, OSError):
                return False

        wait_until(accepted, 20, f"the API server to accept a token for {user}", every_s=0.05)
        return token

    def service_account_kubeconfig(self, namespace: str, name: str) -> Path:
        """What kubelet gives a pod: a token of its ServiceAccount (here as a kubeconfig)."""
        token = self.mint_token(f"system:serviceaccount:{namespace}:{name}")
        path = self.workdir / f"kubeconfig-{namespace}-{name}-{token[:6]}"
        return write_kubeconfig(path, self.url, token, self.ca_file, namespace)

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)

    def audit(self) -> list[dict[str, Any]]:
        """The API server's request log: complete once it has stopped."""
        self.stop()
        return [json.loads(line) for line in self.audit_log.read_text().splitlines()]


@dataclass
class OperatorProcess:
    log: Path
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        stop_group(self.proc)


def chart_documents() -> list[dict[str, Any]]:
    """Every object of the chart, rendered with CHART_VALUES by the real Helm engine."""
    with helm.Chart.load(CHART_DIR) as chart:
        manifests = chart.render(CHART_VALUES, name=RELEASE, namespace=OPERATOR_NAMESPACE, is_install=True)
    return [doc for path, text in sorted(manifests.items()) if path.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc]


def chart_install_objects() -> list[dict[str, Any]]:
    """The chart's ServiceAccount and RBAC; the Deployment and Service are left out because the
    operator runs as a local process."""
    return [doc for doc in chart_documents() if doc["kind"] in INSTALLED_KINDS]


def chart_watch_arguments() -> list[str]:
    """The --namespace arguments the chart's Deployment gives the operator, so the local process
    watches exactly where the chart granted it rights."""
    [deployment] = [doc for doc in chart_documents() if doc["kind"] == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return [arg for arg in container["args"] if arg.startswith("--namespace=")]


def checkout_env(**extra: str) -> dict[str, str]:
    """This process's environment with this checkout's packages first on PYTHONPATH: the venv's
    `kuberlhf` may be an editable install of another checkout."""
    return {**os.environ, "PYTHONPATH": CHECKOUT_PYTHONPATH, **extra}


def _start(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=checkout_env(**(env or {})),
                                start_new_session=True)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """The API emulator as a process (RBAC enforced), with the RLHFJob CRD, KubeRay's CRDs and the
    chart's operator ServiceAccount + RBAC applied through the real kubectl."""
    work = tmp_path / "cluster"
    work.mkdir()
    cluster = Cluster("", work / "kubeconfig-admin", work / "ca.crt", work / "tokens.jsonl",
                      work / "audit.jsonl", work)
    cluster.tokens_file.touch()
    cluster.proc = _start([sys.executable, "-m", "tests.e2e.apiserver", "--kubeconfig",
                           str(cluster.admin_kubeconfig), "--ca-file", str(cluster.ca_file),
                           "--tokens", str(cluster.tokens_file), "--audit-log", str(cluster.audit_log)],
                          work / "apiserver.log")
    try:
        cluster.url = wait_until(lambda: _first_line(work / "apiserver.log"), 30, "the API server to start")
        wait_until(cluster.admin_kubeconfig.exists, 10, "the admin kubeconfig")
        crd_file = work / "rlhfjob-crd.yaml"
        crd = subprocess.run([str(VENV_BIN / "kuberlhf"), "crd"], capture_output=True, text=True, check=True,
                             timeout=60, env=checkout_env())
        crd_file.write_text(crd.stdout)
        cluster.kubectl("apply", "-f", str(crd_file))
        # KubeRay's CRDs are installed by KubeRay's own chart; `create`, as its docs advise: they are
        # too large for apply's last-applied annotation.
        for kind in ("RayCluster", "RayJob"):
            cluster.kubectl("create", "-f", str(kuberay_crd_file(kind)))
        namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OPERATOR_NAMESPACE}}
        install = work / "chart-rbac.yaml"
        install.write_text(yaml.safe_dump_all([namespace, *chart_install_objects()]))
        cluster.kubectl("apply", "-f", str(install))
        yield cluster
    finally:
        cluster.stop()


def _first_line(path: Path) -> str | None:
    lines = path.read_text().splitlines() if path.exists() else []
    return next((line for line in lines if line.startswith("https://")), None)


@pytest.fixture
def operator_account() -> tuple[str, str]:
    """The ServiceAccount the chart creates and binds for the operator: (namespace, name)."""
    objects = chart_install_objects()
    [account] = [o for o in objects if o["kind"] == "ServiceAccount"]
    return account["metadata"].get("namespace", OPERATOR_NAMESPACE), account["metadata"]["name"]


@pytest.fixture
def operator(cluster: Cluster, operator_account: tuple[str, str],
             tmp_path: Path) -> Iterator[OperatorProcess]:
    """`kuberlhf operator` as a process, authenticated as the chart's ServiceAccount."""
    kubeconfig = cluster.service_account_kubeconfig(*operator_account)
    health = free_port()
    log = tmp_path / "operator.log"
    proc = _start([str(VENV_BIN / "kuberlhf"), "operator", "--health-port", str(health),
                   "--metrics-port", str(free_port()), *chart_watch_arguments()], log,
                  env={"KUBECONFIG": str(kubeconfig)})
    try:
        def healthy() -> bool:
            assert proc.poll() is None, f"the operator exited:\n{log.read_text()}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=2) as response:
                    return bool(response.status == 200)
            except OSError:
                return False

        wait_until(healthy, 60, "the operator's liveness endpoint")
        yield OperatorProcess(log, proc)
    finally:
        stop_group(proc)


@pytest.fixture
def runner(cluster: Cluster, tmp_path: Path, model_cache_dir: Path) -> EntrypointRunner:
    return EntrypointRunner(tmp_path / "kuberay", cluster.service_account_kubeconfig,
                            extra_env={"KUBERLHF_CACHE": str(model_cache_dir), "OMP_NUM_THREADS": "1",
                                       "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"})


@pytest.fixture
def kuberay(cluster: Cluster, runner: EntrypointRunner,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[KubeRayStandIn]:
    """The KubeRay TEST STAND-IN in this process; pods take a few seconds to be ready, as real ones do.
    Its watch uses urllib's default TLS context, which trusts SSL_CERT_FILE: the cluster's CA."""
    monkeypatch.setenv("SSL_CERT_FILE", str(cluster.ca_file))
    token = cluster.mint_token(STANDIN_USER)
    kubeconfig = write_kubeconfig(cluster.workdir / "kubeconfig-kuberay", cluster.url, token, cluster.ca_file)
    api = KubeApi.from_environment(str(kubeconfig))
    try:
        with KubeRayStandIn(api, cluster.url, token, runner=runner, cluster_ready_after_s=3.0) as standin:
            yield standin
    finally:
        runner.wait_idle(timeout_s=runner.grace_s + 10)
