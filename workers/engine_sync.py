"""The rollout engines and their weight-sync group with trainer rank 0, kept whole.

A rollout engine is stateless between steps (its weights are the trainer's), so losing one
costs only a replacement: a new actor in the dead one's bundle, a fresh sync group (the old
one has a dead member) and a sync. The trainers hold the only state that matters; when they
fail, the run fails and resumes from its checkpoint instead.
"""

from __future__ import annotations

import time
from typing import Any

from kuberlhf.workers.faults import ROLLOUT_RETRIES, unresponsive, wait_all
from kuberlhf.workers.groups import ActorGroup
from kuberlhf.workers.weight_sync import make_transports, plan_buckets, resolve_transport

from kuberlhf.api import RLHFJobSpec

SYNC_HINT = (
    "raise spec.weightSync.timeoutSeconds for a large model, or check that trainer and rollout pods "
    "can reach each other (weightSync.transport object-store needs no open ports)"
)


class EngineSync:
    def __init__(
        self, spec: RLHFJobSpec, engines: ActorGroup, trainers: list[Any], on_gpu: bool, step_timeout: float
    ):
        self.spec, self.engines, self.trainers = spec, engines, trainers
        self.timeout_s = spec.weight_sync.timeout_seconds
        self.step_timeout = step_timeout
        self.transport = resolve_transport(spec.weight_sync.transport, on_gpu)
        self.restarts = 0  # engines replaced so far

    @property
    def rollouts(self) -> list[Any]:
        return self.engines.actors

    def connect(self) -> None:
        """(Re)build the sync group: at start, and after an engine was replaced."""
        rank0 = self.trainers[0]
        meta = wait_all(
            [("actor rank 0", rank0.param_meta.remote())], self.timeout_s, "sync setup", SYNC_HINT
        )
        address = ("", 0)
        if self.transport != "object-store":
            address = wait_all(
                [("actor rank 0", rank0.sync_address.remote())], self.timeout_s, "sync setup", SYNC_HINT
            )[0]
        plan = plan_buckets(meta[0], self.spec.weight_sync.bucket_m_b * 2**20)
        sender, receivers = make_transports(self.transport, address, len(self.rollouts), plan, self.timeout_s)
        wait_all(
            [("actor rank 0", rank0.join_weight_sync.remote(sender))]
            + [
                (f"rollout engine {i}", r.join_weight_sync.remote(rcv))
                for i, (r, rcv) in enumerate(zip(self.rollouts, receivers, strict=True))
            ],
            self.timeout_s,
            "joining the weight-sync group",
            SYNC_HINT,
        )

    def sync(self) -> float:
        """Trainer weights → every engine; seconds taken. An engine that dies on the way is
        replaced and the sync redone (the weights are the same), so only trainers fail a sync."""
        started = time.perf_counter()
        for attempt in range(ROLLOUT_RETRIES + 1):
            try:
                self._sync_once()
                break
            except Exception as exc:
                dead = self.dead()
                if not dead or attempt == ROLLOUT_RETRIES:
                    raise
                print(
                    f"weight sync failed ({type(exc).__name__}); replacing rollout engines {dead}", flush=True
                )
                self.replace(dead)
        return time.perf_counter() - started

    def _sync_once(self) -> None:
        sent = [a.send_weights.remote() for a in self.trainers]
        # Object store: engines start once rank 0 has put the weights (Ray resolves the ref first).
        # Collective: every member must be inside the broadcast at once, so nothing waits on rank 0.
        payload = sent[0] if self.transport == "object-store" else None
        received = [r.receive_weights.remote(payload) for r in self.rollouts]
        wait_all(
            [(f"actor rank {i}", ref) for i, ref in enumerate(sent)]
            + [(f"rollout engine {i}", ref) for i, ref in enumerate(received)],
            self.timeout_s,
            "weight sync",
            SYNC_HINT,
        )

    def dead(self) -> list[int]:
        """Engines to replace: dead, or hung past the weight-sync deadline (a ping waits behind a
        stuck receive for at most that long)."""
        return unresponsive(self.rollouts, self.timeout_s)

    def replace(self, dead: list[int]) -> None:
        """New engines in the dead ones' bundles, a new sync group, the trainer's current weights."""
        import ray

        for i in dead:
            ray.kill(self.rollouts[i])  # a hung engine still holds its bundle
            self.engines.replace(i)
        self.restarts += len(dead)
        wait_all(
            [(f"rollout engine {i}", self.rollouts[i].ready.remote()) for i in dead],
            self.step_timeout,
            "starting replacement rollout engines",
            "raise spec.schedule.stepTimeoutSeconds if loading the model legitimately takes longer",
        )
        self.connect()
        self._sync_once()
