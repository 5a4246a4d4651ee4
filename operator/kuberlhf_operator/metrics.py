"""Prometheus metrics of the operator: reconciles, errors, and jobs per phase.

Each operator instance owns its CollectorRegistry, so several operators in one process
(tests) never collide on metric names, and /metrics shows only this operator's numbers.
"""

from __future__ import annotations

import threading

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge

from kuberlhf_operator.status import PHASES


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reconciles = Counter("kuberlhf_reconciles", "RLHFJob reconciles, by what triggered them",
                                  ["trigger"], registry=self.registry)
        self.errors = Counter("kuberlhf_reconcile_errors", "Reconciles that ended in an error, by reason",
                              ["reason"], registry=self.registry)
        self.jobs = Gauge("kuberlhf_jobs", "RLHFJobs the operator tracks, by phase", ["phase"],
                          registry=self.registry)
        self._phases: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()
        for phase in PHASES:
            self.jobs.labels(phase=phase).set(0)

    def observe_phase(self, namespace: str, name: str, phase: str | None) -> None:
        """Record a job's latest phase (None: the job is gone) and refresh the per-phase gauge."""
        with self._lock:
            if phase is None:
                self._phases.pop((namespace, name), None)
            else:
                self._phases[(namespace, name)] = phase
            counts = {p: 0 for p in PHASES}
            for value in self._phases.values():
                counts[value] = counts.get(value, 0) + 1
        for p, count in counts.items():
            self.jobs.labels(phase=p).set(count)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Expose /metrics on `port` from a daemon thread."""
        prometheus_client.start_http_server(port, addr=addr, registry=self.registry)
