"""The rollout engines and their weight-sync group with trainer rank 0, kept whole.

A rollout engine is stateless between steps (its weights are the trainer's), so losing one
costs only a replacement: a new actor in the dead one's bundle, a fresh sync group (the old
one has a dead member) and a sync. The trainers hold the only state that matters; when they
fail, the run fails and resumes from its checkpoint instead.
"""

from __future__ import annotations

import time

from kuberlhf.api import RLHFJobSpec
from kuberlhf_workers.base.engine_transports import transport_kind
from kuberlhf_workers.base.transports import WeightTransport, plan_buckets
from kuberlhf_workers.control.faults import ROLLOUT_RETRIES, unresponsive, wait_all
from kuberlhf_workers.control.groups import ActorGroup
from kuberlhf_workers.control.handles import RolloutHandle, TrainerHandle

SYNC_HINT = (
    "raise spec.weightSync.timeoutSeconds for a large model, or check that trainer and rollout pods "
    "can reach each other (weightSync.transport object-store needs no open ports)"
)


class WeightSync:
    def __init__(
        self,
        spec: RLHFJobSpec,
        engines: ActorGroup[RolloutHandle],
        trainers: list[TrainerHandle],
        step_timeout: float,
    ):
        self.spec, self.engines, self.trainers = spec, engines, trainers
        self.timeout_s = spec.weight_sync.timeout_seconds
        self.step_timeout = step_timeout
        self.kind = transport_kind(spec)
        self.sender: WeightTransport | None = None
        self.restarts = 0  # engines replaced so far

    @property
    def rollouts(self) -> list[RolloutHandle]:
        return self.engines.actors

    def connect(self) -> None:
        """(Re)build the sync group: at start, and after an engine was replaced."""
        rank0 = self.trainers[0]
        meta = wait_all([(rank0.label, rank0.param_meta())], self.timeout_s, "sync setup", SYNC_HINT)[0]
        address = ("", 0)
        if self.kind.rendezvous:
            ask = [(rank0.label, rank0.sync_address())]
            address = wait_all(ask, self.timeout_s, "sync setup", SYNC_HINT)[0]
        plan = plan_buckets(meta, self.spec.weight_sync.bucket_mb * 2**20)
        sender, receivers = self.kind.make(address, len(self.rollouts), plan, self.timeout_s)
        self.sender = sender
        wait_all(
            [(rank0.label, rank0.join_weight_sync(sender))]
            + [(r.label, r.join_weight_sync(rcv)) for r, rcv in zip(self.rollouts, receivers, strict=True)],
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
        sent = [a.send_weights() for a in self.trainers]
        # Receivers that need the sender's payload start once rank 0 produced it (Ray resolves the
        # ref first); in a collective every member must be inside the transfer at once, so nothing
        # waits on rank 0.
        assert self.sender is not None, "connect() first"
        payload = sent[0] if self.sender.receivers_wait_for_sender else None
        received = [r.receive_weights(payload) for r in self.rollouts]
        wait_all(
            [(a.label, ref) for a, ref in zip(self.trainers, sent, strict=True)]
            + [(r.label, ref) for r, ref in zip(self.rollouts, received, strict=True)],
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
        for i in dead:
            self.rollouts[i].kill()  # a hung engine still holds its bundle
            self.engines.replace(i)
        self.restarts += len(dead)
        wait_all(
            [(self.rollouts[i].label, self.rollouts[i].ready()) for i in dead],
            self.step_timeout,
            "starting replacement rollout engines",
            "raise spec.schedule.stepTimeoutSeconds if loading the model legitimately takes longer",
        )
        self.connect()
        self._sync_once()
