"""Fault injection for the API emulator: the failures a real API server hands its clients.

A `FaultPlan` is consulted by the emulator for every request (`intercept`) and for every
watch (`expire_watch`, `drop_after`). Each rule is explicit and finite — answer the next N
matching requests with a status, close watch streams after K events, answer the next N watch
resumptions with 410 Gone — so a test says exactly what goes wrong and can count what did.
Rules match on method, a regular expression over the path, and optionally the user, so a
test can hit only the operator and leave fixtures and the KubeRay stand-in alone.
"""

from __future__ import annotations

import collections
import re
import threading
import time
from dataclasses import dataclass, field

REASONS = {409: "Conflict", 410: "Gone", 429: "TooManyRequests", 500: "InternalError",
           503: "ServiceUnavailable", 504: "Timeout"}


@dataclass
class Fault:
    """Answer the next `times` requests matching method + path (+ user) with `status`."""

    method: str
    path: str
    status: int
    times: int = 1
    user: str | None = None
    retry_after_s: int | None = None
    watch: bool = False
    injected: int = 0
    at: list[float] = field(default_factory=list)  # time.monotonic() of each injection

    def matches(self, method: str, path: str, user: str, watch: bool) -> bool:
        return (self.injected < self.times and self.method in ("*", method) and watch == self.watch
                and (self.user is None or self.user == user) and re.search(self.path, path) is not None)


@dataclass
class Injected:
    """What `intercept` tells the emulator to answer instead of serving the request."""

    status: int
    reason: str
    message: str
    headers: dict[str, str]


@dataclass
class FaultPlan:
    """The faults to inject; thread-safe, since tests arm it while the emulator serves."""

    faults: list[Fault] = field(default_factory=list)
    drop_watch_after_events: int | None = None
    watch_drops_left: int = 0
    drop_user: str | None = None
    expired_resumes_left: int = 0
    expire_user: str | None = None
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def drop_watches(self, after_events: int, times: int, user: str | None = None) -> None:
        """Close the next `times` watch streams (of `user`) once each has sent `after_events` events."""
        with self._lock:
            self.drop_watch_after_events, self.watch_drops_left = after_events, times
            self.drop_user = user

    def expire_resumes(self, times: int, user: str | None = None) -> None:
        """Answer the next `times` watches that resume from a resourceVersion with 410 Gone."""
        with self._lock:
            self.expired_resumes_left, self.expire_user = times, user

    def intercept(self, method: str, path: str, user: str, watch: bool) -> Injected | None:
        with self._lock:
            fault = next((f for f in self.faults if f.matches(method, path, user, watch)), None)
            if fault is None:
                return None
            fault.injected += 1
            fault.at.append(time.monotonic())
            self.counts[str(fault.status)] += 1
        reason = REASONS.get(fault.status, "Injected")
        headers = {"Retry-After": str(fault.retry_after_s)} if fault.retry_after_s is not None else {}
        return Injected(fault.status, reason, f"injected fault: {reason} for {method} {path}", headers)

    def expire_watch(self, user: str) -> bool:
        """True: answer this resuming watch with 410 Gone (as after etcd compaction)."""
        with self._lock:
            if self.expired_resumes_left <= 0 or (self.expire_user and self.expire_user != user):
                return False
            self.expired_resumes_left -= 1
            self.counts["410"] += 1
            return True

    def drop_after(self, user: str) -> int | None:
        """How many events the watch being opened may send before it is closed (None: no limit)."""
        with self._lock:
            if self.watch_drops_left <= 0 or self.drop_watch_after_events is None or \
                    (self.drop_user and self.drop_user != user):
                return None
            self.watch_drops_left -= 1
            return self.drop_watch_after_events

    def dropped(self) -> None:
        """The emulator closed a watch stream under the client (counted only when it happens)."""
        with self._lock:
            self.counts["watch-drop"] += 1

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())
