"""`kuberlhf operator` as a process: it serves liveness and metrics, works, and exits 0 on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.emulator import EmulatorHandle
from tests.operator.conftest import OPERATOR_USER, running_standin, user_api, wait_for
from tests.operator.test_handlers import job_status, tiny_job


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def fetch(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.read().decode() if response.status == 200 else None
    except OSError:
        return None


def test_operator_command_serves_probes_reconciles_and_stops_on_sigterm(cluster: EmulatorHandle) -> None:
    _, kubeconfig = user_api(cluster, OPERATOR_USER)
    health, metrics = free_port(), free_port()
    cli = Path(sys.executable).parent / "kuberlhf"
    process = subprocess.Popen(
        [str(cli), "operator", "--namespace", "default", "--health-port", str(health),
         "--metrics-port", str(metrics), "--kuberay-namespace", "kuberay"],
        # POD_NAMESPACE is what the chart's downward API gives the operator's pod.
        env={**os.environ, "KUBECONFIG": str(kubeconfig), "POD_NAMESPACE": "kuberlhf-system"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: fetch(f"http://127.0.0.1:{health}/healthz"), what="/healthz")
        with running_standin(cluster):
            cluster.create(tiny_job())
            wait_for(lambda: job_status(cluster).get("phase") == "Succeeded", what="Succeeded")
        exposition = wait_for(lambda: fetch(f"http://127.0.0.1:{metrics}/metrics"), what="/metrics")
        assert 'kuberlhf_jobs{phase="Succeeded"} 1.0' in exposition
        assert "kuberlhf_reconciles_total" in exposition
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, output
    assert "watching RLHFJobs in default" in output and "created" in output
    policy = cluster.get("networking.k8s.io", "networkpolicies", "default", "tiny-ingress")
    assert policy is not None
    pinned = [peer["namespaceSelector"]["matchLabels"] for rule in policy["spec"]["ingress"]
              for peer in rule["from"] if "namespaceSelector" in peer]
    assert pinned == [{"kubernetes.io/metadata.name": "kuberlhf-system"},
                      {"kubernetes.io/metadata.name": "kuberay"}], "the job's dashboard admits both operators"
