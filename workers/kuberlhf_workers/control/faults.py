"""Bounded waits and clear failures for the driver.

A distributed step can stall forever on one stuck worker (a hung collective, a reward server
that never answers) or die with a traceback from deep inside Ray. The driver therefore waits
on every remote call with a deadline derived from the spec, and turns the ways a step can
fail into errors that say what failed, after how long, and what to do next.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kuberlhf_workers.control.handles import Handle

ROLLOUT_RETRIES = 3  # replacements of dead rollout engines per step before the run gives up


class StepFailed(RuntimeError):
    """A step could not complete; the message names the part that failed and the way out."""


class StepTimeout(StepFailed):
    pass


class ActorDied(StepFailed):
    """A worker process is gone (killed, OOM, node lost); `label` says which."""

    def __init__(self, label: str, cause: BaseException):
        super().__init__(f"{label} died: {type(cause).__name__}: {_first_line(cause)}")
        self.label = label
        self.cause = cause


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"


def wait_all(labelled: Sequence[tuple[str, Any]], timeout_s: float, what: str, hint: str) -> list[Any]:
    """The values of every (label, ObjectRef), failing as soon as one fails instead of after the
    slowest: a dead actor raises ActorDied naming its label, other remote errors propagate, and
    nothing finishing within `timeout_s` raises StepTimeout naming `what` and `hint`."""
    import ray
    from ray.exceptions import RayActorError

    labels = {ref: label for label, ref in labelled}
    deadline = time.monotonic() + timeout_s
    waiting = list(labels)
    while waiting:
        left = deadline - time.monotonic()
        ready, waiting = ray.wait(waiting, num_returns=1, timeout=max(left, 0.0), fetch_local=False)
        if not ready:
            raise StepTimeout(f"{what} did not finish within {timeout_s:g}s; {hint}")
        for ref in ready:
            try:
                ray.get(ref, timeout=max(deadline - time.monotonic(), 0.0))
            except RayActorError as exc:
                raise ActorDied(labels[ref], exc) from exc
    return [ray.get(ref) for _, ref in labelled]


def wait_ready(refs: Sequence[Any], timeout_s: float, what: str, hint: str) -> None:
    """Wait until every ref is done without fetching it (errors surface where it is used)."""
    import ray

    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s, fetch_local=False)
    if len(ready) < len(refs):
        raise StepTimeout(f"{what} did not finish within {timeout_s:g}s; {hint}")


def unresponsive(actors: Sequence[Handle], timeout_s: float) -> list[int]:
    """Indexes of the actors that are dead or do not answer a ping within `timeout_s` (all are
    pinged at once; a ping queues behind the actor's current call, so allow for that)."""
    import ray
    from ray.exceptions import RayActorError

    pings = [actor.ready() for actor in actors]
    ray.wait(pings, num_returns=len(pings), timeout=timeout_s, fetch_local=False)
    out = []
    for i, ping in enumerate(pings):
        try:
            ray.get(ping, timeout=0)
        except (RayActorError, ray.exceptions.GetTimeoutError):
            out.append(i)
    return out
