"""Calling a reward server (POST /score) from the training loop, as if it were a reward function.

A remote reward server that hangs or flaps is a common way for RLHF runs to stall, so every
request has a timeout, transient failures (connection errors, timeouts, 5xx, 429) are retried
with capped exponential backoff and jitter, client errors (other 4xx) fail at once, and a server
that stays down ends in one `RewardServerError` naming the URL and the last failure.
Plain threads and urllib: the client works from any caller, with or without an event loop.
"""

from __future__ import annotations

import json
import random
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

MAX_BACKOFF_S = 10.0
BATCH_SIZE, CONCURRENCY = 64, 4  # rows per request, requests in flight


class RewardServerError(RuntimeError):
    """The reward server could not score a batch; the message names the URL and what happened."""


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def score_url(url: str) -> str:
    base = url.rstrip("/")
    return base if base.endswith("/score") else f"{base}/score"


def backoff_delay(attempt: int, base_s: float, rng: random.Random) -> float:
    """Full jitter: uniform in [0, base * 2^attempt], capped, so retrying clients spread out."""
    return rng.uniform(0, min(MAX_BACKOFF_S, base_s * 2**attempt))


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After in seconds (the HTTP-date form is not used by reward servers: treated as absent)."""
    try:
        return min(MAX_BACKOFF_S, max(0.0, float(value))) if value is not None else None
    except ValueError:
        return None


def batches(count: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, count)) for start in range(0, count, size)]


class RewardClient:
    """`(prompts, completions, **kw) -> list[float]` backed by a remote /score endpoint."""

    def __init__(
        self,
        url: str,
        timeout_s: float = 30,
        max_retries: int = 3,
        token: str | None = None,
        concurrency: int = CONCURRENCY,
        batch_size: int = BATCH_SIZE,
        backoff_s: float = 0.5,
    ):
        if batch_size < 1 or concurrency < 1:
            raise ValueError("batch_size and concurrency must be at least 1")
        self.url = score_url(url)
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.token = token
        self.concurrency = concurrency
        self.batch_size = batch_size
        self.backoff_s = backoff_s
        self._rng = random.Random()

    def __call__(self, prompts: list[str], completions: list[str], **kw: Any) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        spans = batches(len(prompts), self.batch_size)
        if len(spans) <= 1 or self.concurrency == 1:
            parts = [self._score_batch(prompts[a:b], completions[a:b]) for a, b in spans]
        else:
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(spans))) as pool:
                parts = list(
                    pool.map(
                        lambda span: self._score_batch(
                            prompts[span[0] : span[1]], completions[span[0] : span[1]]
                        ),
                        spans,
                    )
                )
        return [score for part in parts for score in part]

    def _score_batch(self, prompts: list[str], completions: list[str]) -> list[float]:
        body = json.dumps({"prompts": prompts, "completions": completions}).encode()
        last = "no attempt made"
        for attempt in range(self.max_retries + 1):
            try:
                return self._post(body, len(prompts))
            except _Retryable as exc:
                last = str(exc)
                if attempt == self.max_retries:
                    break
                delay = (
                    exc.retry_after
                    if exc.retry_after is not None
                    else backoff_delay(attempt, self.backoff_s, self._rng)
                )
                time.sleep(delay)
        raise RewardServerError(
            f"reward server {self.url} failed after {self.max_retries + 1} attempts: {last} "
            "(check that the server is running and reachable: spec.reward.url / the reward pods)"
        )

    def _post(self, body: bytes, expected: int) -> list[float]:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = _error_detail(exc)
            if exc.code == 429 or exc.code >= 500:
                raise _Retryable(
                    f"HTTP {exc.code}: {detail}", retry_after_seconds(exc.headers.get("Retry-After"))
                ) from None
            raise RewardServerError(
                f"reward server {self.url} rejected the request: HTTP {exc.code}: {detail}"
            ) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            raise _Retryable(f"cannot reach the server ({reason})") from None
        scores = payload.get("scores") if isinstance(payload, dict) else None
        if not isinstance(scores, list) or len(scores) != expected:
            raise RewardServerError(
                f"reward server {self.url} answered without {expected} scores (got {str(payload)[:200]!r})"
            )
        return [float(s) for s in scores]


def _error_detail(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read()).get("error", exc.reason))
    except (ValueError, AttributeError, OSError):
        return str(exc.reason)
