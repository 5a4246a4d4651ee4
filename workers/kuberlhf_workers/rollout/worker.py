"""The Ray rollout actor: one rollout engine, whatever its backend, plus its end of the weight sync."""

from __future__ import annotations

import os
from typing import Any

import torch

from kuberlhf.api import RLHFJobSpec
from kuberlhf_workers.base.models import ModelRef, local_model, pick_device
from kuberlhf_workers.base.samples import GenerationRequest, GenerationResult, summarize
from kuberlhf_workers.base.transports import WeightTransport
from kuberlhf_workers.rollout.backend import make_backend


class RolloutWorker:
    """One rollout engine inside a Ray actor: generates, and receives weights from the trainer."""

    def __init__(self, spec: RLHFJobSpec, model: ModelRef, gpus: float, threads: int):
        if threads:
            torch.set_num_threads(threads)
        self.backend = make_backend(spec, local_model(model), pick_device(gpus))
        self.receiver: WeightTransport | None = None
        self.asleep = False

    def ready(self) -> bool:
        return True

    def generate(self, request: GenerationRequest) -> GenerationResult:
        self._awake("generate")
        return self.backend.generate(request)

    def _awake(self, what: str) -> None:
        if self.asleep:
            raise RuntimeError(f"{what} while the rollout engine sleeps: wake_up() first")

    def sleep(self) -> None:
        """Give the GPU back to the colocated trainer until `wake_up`."""
        self.backend.sleep()
        self.asleep = True

    def wake_up(self) -> None:
        self.backend.wake_up()
        self.asleep = False

    def rollout(self, request: GenerationRequest) -> tuple[dict[str, int], GenerationResult]:
        """`generate` plus a small summary, for two return refs: the driver fetches the summary to
        learn that the rollout is done (or that this engine died) while the result stays in the
        object store for the reward worker and the trainers."""
        self._awake("rollout")
        result = self.backend.generate(request)
        return summarize(result), result

    def join_weight_sync(self, receiver: WeightTransport) -> None:
        """Connect to the trainer's sync group (blocks until every member joined)."""
        receiver.connect()
        self.receiver = receiver

    def receive_weights(self, payload: Any = None) -> None:
        self._awake("receive_weights")
        if self.receiver is None:
            raise RuntimeError("receive_weights before join_weight_sync: the weight-sync group is not set up")
        self.receiver.receive(payload, self.backend.load_weights)

    def parameters(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.backend.named_parameters()}

    def pid(self) -> int:
        return os.getpid()
