"""Operator at scale: 100 RLHFJobs created at once, until every RayJob exists.

    .venv/bin/python bench/operator_scale.py [--jobs 100] [--out DIR]

Three processes: the API emulator (tests/emulator, served by this file's `--serve-emulator`
mode so its request log can be read back), `kuberlhf operator` (the real CLI, authenticated
as the operator's ServiceAccount, watching namespace `default`) and this one, which creates
the jobs through the API from 16 threads at once (concurrent POSTs, not kubectl) and watches
RayJobs appear. No KubeRay stand-in runs: this measures creation only.

Measured: seconds from the first create until every RayJob exists; each job's latency from
its create answer to its RayJob's ADDED event; API requests the operator made per job (from
the emulator's log, operator identity only), once when the last RayJob appears and again
when the operator has gone quiet; the operator's RSS when idle and its peak (psutil, 20 Hz).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

import summary  # noqa: E402

EXAMPLE = ROOT / "examples" / "tiny-grpo.yaml"
OPERATOR_USER = "system:serviceaccount:kuberlhf-system:kuberlhf-operator"
NAMESPACE = "default"
JOBS_PATH = f"/apis/kuberlhf.io/v1alpha1/namespaces/{NAMESPACE}/rlhfjobs"
RAYJOBS_WATCH = f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayjobs?watch=true"
CREATE_THREADS = 16
QUIET_S = 2.0


def job_manifest(template: dict[str, Any], index: int) -> dict[str, Any]:
    """The example job under a numbered name in the benchmark namespace."""
    job = copy.deepcopy(template)
    job["metadata"] = {"name": f"bench-{index:03d}", "namespace": NAMESPACE}
    return job


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def latencies(created: dict[str, float], rayjob_added: dict[str, float]) -> dict[str, float]:
    """Per job: seconds from its create answer to its RayJob's ADDED event (jobs seen on both)."""
    return {job: rayjob_added[job] - at for job, at in created.items() if job in rayjob_added}


def requests_by_verb(requests: list[dict[str, Any]]) -> dict[str, int]:
    """Logged requests counted by Kubernetes verb (create, patch, get, list, watch, ...);
    a request without one (discovery, /version) counts as `discovery`."""
    return dict(Counter(r.get("verb") or "discovery" for r in requests))


def owner_job(rayjob: dict[str, Any]) -> str | None:
    """The RLHFJob a RayJob belongs to, from its ownerReferences."""
    for ref in rayjob.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == "RLHFJob":
            return str(ref["name"])
    return None


# -- the emulator process ------------------------------------------------------------------------


def serve_emulator(workdir: Path) -> int:
    """Serve the emulator with the RLHFJob and KubeRay CRDs; answer `requests` on stdin with the
    operator's logged requests as one JSON line, until stdin closes."""
    sys.path.insert(0, str(ROOT))
    from kuberlhf import crd
    from tests.emulator import running_emulator, write_kubeconfig
    from tests.kuberay_schema import load_kuberay_crd

    with running_emulator(workdir) as handle:
        # $KUBERLHF_KUBERAY_CRDS, else <repo>/../shared/data/kuberay-crds (tests/kuberay_schema.py).
        kuberay = [load_kuberay_crd("RayJob"), load_kuberay_crd("RayCluster")]
        for definition in [crd.build_crd(), *kuberay]:
            handle.create(definition)
        token = handle.add_token(OPERATOR_USER)
        kubeconfig = write_kubeconfig(workdir / "kubeconfig-operator", handle.url, token)
        hello = {"url": handle.url, "admin_token": handle.emulator.admin_token,
                 "operator_kubeconfig": str(kubeconfig)}
        print(json.dumps(hello), flush=True)
        for line in sys.stdin:
            if line.strip() == "requests":
                logged = [{"verb": r.verb, "resource": r.resource, "method": r.method, "status": r.status}
                          for r in handle.requests(OPERATOR_USER)]
                print(json.dumps(logged), flush=True)
    return 0


class Emulator:
    """The parent's handle on the emulator process: its URL, admin token and request log."""

    def __init__(self, workdir: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve-emulator", str(workdir)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert self.process.stdin and self.process.stdout
        self._in: IO[str] = self.process.stdin
        self._out: IO[str] = self.process.stdout
        line = self._out.readline()
        if not line:
            raise RuntimeError(f"the emulator process exited ({self.process.wait()}) before serving")
        hello = json.loads(line)
        self.url: str = hello["url"]
        self.token: str = hello["admin_token"]
        self.operator_kubeconfig = Path(hello["operator_kubeconfig"])

    def operator_requests(self) -> list[dict[str, Any]]:
        self._in.write("requests\n")
        self._in.flush()
        return json.loads(self._out.readline())  # type: ignore[no-any-return]

    def close(self) -> None:
        self._in.close()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# -- the measurement --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _request(emulator: Emulator, path: str, body: dict[str, Any] | None = None) -> urllib.request.Request:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {emulator.token}", "Content-Type": "application/json"}
    return urllib.request.Request(emulator.url + path, data=data, headers=headers,
                                  method="POST" if data else "GET")


def watch_rayjobs(emulator: Emulator, seen: dict[str, float], ready: threading.Event) -> None:
    """Record when each job's RayJob is ADDED (a watch stream, so polling adds no load)."""
    with urllib.request.urlopen(_request(emulator, RAYJOBS_WATCH), timeout=300) as stream:
        ready.set()
        for line in stream:
            event = json.loads(line)
            job = owner_job(event.get("object") or {})
            if event.get("type") == "ADDED" and job and job not in seen:
                seen[job] = time.perf_counter()


class RssSampler(threading.Thread):
    """The operator's resident set (its whole process tree) every 50 ms."""

    def __init__(self, pid: int) -> None:
        import psutil

        super().__init__(name="rss-sampler", daemon=True)
        self.process = psutil.Process(pid)
        self.peak = self.last = 0
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stop.wait(0.05):
            try:
                rss = sum(p.memory_info().rss for p in [self.process, *self.process.children(recursive=True)])
            except psutil.Error:
                return
            self.last, self.peak = rss, max(self.peak, rss)


@contextlib.contextmanager
def running_operator(kubeconfig: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    health = free_port()
    cli = ROOT / ".venv" / "bin" / "kuberlhf"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(cli), "operator", "--namespace", NAMESPACE, "--health-port", str(health),
             "--metrics-port", str(free_port())],
            env={**os.environ, "KUBECONFIG": str(kubeconfig)}, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while not _healthy(health):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the operator did not become healthy; see {log}")
                time.sleep(0.1)
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def wait_quiet(emulator: Emulator, timeout_s: float) -> list[dict[str, Any]]:
    """The operator's requests once its count has not grown for QUIET_S seconds."""
    deadline = time.monotonic() + timeout_s
    requests = emulator.operator_requests()
    still_since = time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - still_since < QUIET_S:
        time.sleep(0.25)
        latest = emulator.operator_requests()
        if len(latest) != len(requests):
            requests, still_since = latest, time.monotonic()
    return requests


def measure(jobs: int, out: Path, timeout_s: float) -> dict[str, Any]:
    import yaml

    template = yaml.safe_load(EXAMPLE.read_text())
    manifests = [job_manifest(template, i) for i in range(jobs)]
    with tempfile.TemporaryDirectory(prefix="kuberlhf-bench-") as tmp:
        emulator = Emulator(Path(tmp))
        try:
            with running_operator(emulator.operator_kubeconfig, out / "operator.log") as operator:
                sampler = RssSampler(operator.pid)
                sampler.start()
                seen: dict[str, float] = {}
                watching = threading.Event()
                threading.Thread(target=watch_rayjobs, args=(emulator, seen, watching), daemon=True).start()
                watching.wait(timeout=10)
                time.sleep(0.5)  # one idle sample window before the burst
                idle_rss, baseline = sampler.last, len(emulator.operator_requests())
                created: dict[str, float] = {}

                def create(job: dict[str, Any]) -> None:
                    with urllib.request.urlopen(_request(emulator, JOBS_PATH, job), timeout=60):
                        created[job["metadata"]["name"]] = time.perf_counter()

                started = time.perf_counter()
                with ThreadPoolExecutor(CREATE_THREADS) as pool:
                    list(pool.map(create, manifests))
                create_s = time.perf_counter() - started
                deadline = time.monotonic() + timeout_s
                while len(seen) < jobs and time.monotonic() < deadline:
                    time.sleep(0.02)
                all_seen_s = max(seen.values()) - started if len(seen) == jobs else None
                at_all_seen = len(emulator.operator_requests()) - baseline
                settled = wait_quiet(emulator, timeout_s=30)[baseline:]
                sampler.stop.set()
        finally:
            emulator.close()
    waits = list(latencies(created, seen).values())
    return {
        "jobs": jobs,
        "jobs_created": len(created),
        "rayjobs_seen": len(seen),
        "create_s": create_s,
        "all_rayjobs_s": all_seen_s,
        "latency_p50_s": percentile(waits, 50) if waits else None,
        "latency_p95_s": percentile(waits, 95) if waits else None,
        "latency_max_s": max(waits) if waits else None,
        "requests_at_all_rayjobs": at_all_seen,
        "requests_settled": len(settled),
        "requests_per_job": len(settled) / jobs,
        "requests_by_verb": requests_by_verb(settled),
        "requests_by_resource": dict(Counter(r.get("resource") or "-" for r in settled)),
        "operator_idle_rss_mib": idle_rss / 2**20,
        "operator_peak_rss_mib": sampler.peak / 2**20,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100, help="RLHFJobs created at once (default 100)")
    parser.add_argument("--timeout", type=float, default=90,
                        help="seconds allowed for every RayJob to appear (default 90)")
    parser.add_argument("--out", type=Path, help="output folder (default bench/out/<UTC timestamp>-operator)")
    parser.add_argument("--serve-emulator", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_emulator:
        return serve_emulator(args.serve_emulator)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    out: Path = (args.out or BENCH / "out" / f"{stamp}-operator").resolve()
    out.mkdir(parents=True, exist_ok=True)
    measured = measure(args.jobs, out, args.timeout)
    results = {
        "benchmark": "operator",
        "created": stamp,
        "config": {"jobs": args.jobs, "create_via": f"{CREATE_THREADS} threads, POST", "namespace": NAMESPACE,
                   "example": str(EXAMPLE.relative_to(ROOT)), "kuberay_standin": False},
        "machine": {"cpus": os.cpu_count()},
        "measured": measured,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(summary.operator_table([results]))
    print(f"\nresults: {out / 'results.json'}\noperator log: {out / 'operator.log'}")
    if measured["rayjobs_seen"] != args.jobs:
        print(f"only {measured['rayjobs_seen']} of {args.jobs} RayJobs appeared within {args.timeout:.0f} s",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
