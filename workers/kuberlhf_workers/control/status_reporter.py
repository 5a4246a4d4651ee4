"""Live progress into RLHFJob.status, from the driver inside a RayJob.

The driver calls the reporter once per step (the same progress-callback signature as the
JSONL / TensorBoard writers); a background thread merge-patches
/apis/kuberlhf.io/v1alpha1/namespaces/<ns>/rlhfjobs/<name>/status with {"status": {"progress":
...}}, at most once per `min_interval_s`, always sending the newest step (older unsent ones are
dropped: only the latest matters). `close()` flushes the final step. Training never waits on
the API: calls return at once, requests time out quickly, and failures are logged once.
Credentials: the pod's ServiceAccount token (in cluster), or KUBECONFIG when set.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from typing import Any

from kuberlhf.kube import now_rfc3339, rlhfjob_path

log = logging.getLogger("kuberlhf.status")

PATCH_TIMEOUT_S = 5.0
METRIC_KEYS = {
    "reward_mean": "rewardMean",
    "kl": "kl",
    "samples_per_second": "samplesPerSecond",
    "loss": "loss",
    "eval_accuracy": "evalAccuracy",  # rm
    "eval_reward_accuracy": "evalAccuracy",  # dpo: how often the implicit reward prefers `chosen`
    "eval_reward_mean": "evalRewardMean",
    "eval_pass_at_k": "evalPassAtK",
    "turns_mean": "turnsMean",  # multi-turn episodes (spec.environment); absent from single-turn steps
}


def progress_document(step: int, total: int, metrics: dict[str, Any], last_checkpoint: str | None,
                      now: str) -> dict[str, Any]:
    """status.progress as the CRD defines it; non-finite metrics are left out (JSON has no NaN)."""
    progress: dict[str, Any] = {"step": int(step), "totalSteps": int(total), "updatedAt": now}
    for key, field in METRIC_KEYS.items():
        value = metrics.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            progress[field] = round(float(value), 6)
    if last_checkpoint:
        progress["lastCheckpoint"] = last_checkpoint
    return progress


def _api_client() -> Any:
    import kubernetes

    if os.environ.get("KUBECONFIG") or not os.environ.get("KUBERNETES_SERVICE_HOST"):
        return kubernetes.config.new_client_from_config(config_file=os.environ.get("KUBECONFIG"))
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_incluster_config(client_configuration=configuration)
    return kubernetes.client.ApiClient(configuration)


class StatusReporter:
    def __init__(self, job_name: str, namespace: str, api_client: Any = None, min_interval_s: float = 5.0,
                 timeout_s: float = PATCH_TIMEOUT_S) -> None:
        self.path = rlhfjob_path(namespace, job_name, "status")
        self.min_interval_s = min_interval_s
        self.timeout_s = timeout_s
        self.sent = 0
        self.failures = 0
        self._client = api_client
        self._pending: dict[str, Any] | None = None
        self._last_sent = -math.inf
        self._closing = False
        self._warned = False
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="kuberlhf-status", daemon=True)
        self._thread.start()

    def report(self, step: int, total: int, metrics: dict[str, Any], last_checkpoint: str | None) -> None:
        """Queue this step's progress (replacing any unsent one) and return immediately."""
        now = now_rfc3339()
        with self._wake:
            self._pending = progress_document(step, total, metrics, last_checkpoint, now)
            self._wake.notify()

    __call__ = report

    def close(self, timeout_s: float | None = None) -> None:
        """Send the last reported step now (ignoring the interval), then stop the thread."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout=timeout_s if timeout_s is not None else self.timeout_s + 1)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while True:
                    wait = self._last_sent + self.min_interval_s - time.monotonic()
                    if self._pending is not None and (wait <= 0 or self._closing):
                        break
                    if self._closing:
                        return
                    self._wake.wait(timeout=wait if self._pending is not None else None)
                progress, self._pending = self._pending, None
                closing = self._closing
            self._send(progress)
            if closing and self._pending is None:
                return

    def _send(self, progress: dict[str, Any]) -> None:
        self._last_sent = time.monotonic()
        try:
            if self._client is None:
                self._client = _api_client()
            headers = {"Accept": "application/json", "Content-Type": "application/merge-patch+json"}
            method, url, headers, body, _ = self._client.param_serialize(
                "PATCH", self.path, header_params=headers, body={"status": {"progress": progress}},
                auth_settings=["BearerToken"])
            response = self._client.call_api(method, url, headers, body, _request_timeout=self.timeout_s)
            data = response.read()
            if not 200 <= response.status < 300:
                message = json.loads(data).get("message", "") if data else ""
                raise RuntimeError(f"HTTP {response.status}: {message}")
            self.sent += 1
        except Exception as exc:
            self.failures += 1
            if not self._warned:
                self._warned = True
                log.warning("cannot report progress to %s (%s); training continues, will keep trying",
                            self.path, exc)


def from_environment(min_interval_s: float = 5.0) -> StatusReporter | None:
    """A reporter for the RLHFJob named by KUBERLHF_JOB_NAME / KUBERLHF_NAMESPACE, or None outside one."""
    name, namespace = os.environ.get("KUBERLHF_JOB_NAME"), os.environ.get("KUBERLHF_NAMESPACE")
    if not name or not namespace:
        return None
    return StatusReporter(name, namespace, min_interval_s=min_interval_s)
