"""The Ray rollout actor: one rollout engine, whatever its backend, plus its end of the weight sync."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from kuberlhf.api import RLHFJobSpec
from kuberlhf.engine_choice import resolved_engine
from kuberlhf_workers.base.environments import load_environment_class, max_turns
from kuberlhf_workers.base.models import ModelRef, local_model, pick_device
from kuberlhf_workers.base.samples import GenerationRequest, GenerationResult, summarize
from kuberlhf_workers.base.transports import WeightTransport
from kuberlhf_workers.rollout.backend import make_backend
from kuberlhf_workers.rollout.episodes import TurnGenerator, run_episodes


class RolloutWorker:
    """One rollout engine inside a Ray actor: generates, and receives weights from the trainer."""

    def __init__(self, spec: RLHFJobSpec, model: ModelRef, gpus: float, threads: int, spec_dir: str = "."):
        if threads:
            torch.set_num_threads(threads)
        self.spec = spec
        self.backend = make_backend(spec, local_model(model), pick_device(gpus))
        self.receiver: WeightTransport | None = None
        self.asleep = False
        # Loaded where the episodes run: a class from a spec's file lives in a module no other
        # process can import, so it is never pickled across.
        self.env_class: type | None = None
        if spec.environment is not None:
            self.env_class = load_environment_class(spec.environment.class_, Path(spec_dir))
            self.max_turns = max_turns(self.env_class, spec.environment.max_turns)
            if not isinstance(self.backend, TurnGenerator):
                raise ValueError(f"spec.environment: rollout.engine {resolved_engine(spec)} cannot run "
                                 "multi-turn episodes; set rollout.engine: hf or vllm")

    def ready(self) -> bool:
        return True

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Single-turn completions, or with spec.environment whole episodes."""
        self._awake("generate")
        if self.env_class is None or self.spec.environment is None:
            return self.backend.generate(request)
        assert isinstance(self.backend, TurnGenerator)  # checked in __init__
        return run_episodes(self.backend, self.env_class, self.spec.environment, self.max_turns, request)

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
        result = self.generate(request)
        return summarize(result), result

    def join_weight_sync(self, receiver: WeightTransport) -> None:
        """Connect to the trainer's sync group (blocks until every member joined)."""
        receiver.connect(self.backend)
        self.receiver = receiver

    def receive_weights(self, payload: Any = None) -> None:
        self._awake("receive_weights")
        if self.receiver is None:
            raise RuntimeError("receive_weights before join_weight_sync: the weight-sync group is not set up")
        self.receiver.receive(payload, self.backend)

    def parameters(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.backend.named_parameters()}

    def pid(self) -> int:
        return os.getpid()
