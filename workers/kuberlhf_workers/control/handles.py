"""Typed handles on the Ray actors of each group, so the driver's remote calls are checked.

A Ray actor handle accepts any attribute: `actor.trian.remote()` fails only at run time, deep in
a step. The driver talks to these facades instead; each method is one remote call of the worker
class it names (tests/test_seams.py holds every facade to its worker's methods and
signatures), and mypy checks the driver's calls against them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from ray import ObjectRef
    from ray.actor import ActorHandle

    from kuberlhf_workers.base.records import Example
    from kuberlhf_workers.base.samples import GenerationRequest, GenerationResult
    from kuberlhf_workers.base.transports import ParamMeta, WeightTransport


class Handle:
    """One actor and the label errors name it by ("rollout engine 1", "actor rank 0")."""

    def __init__(self, actor: ActorHandle, label: str):
        self.actor, self.label = actor, label

    def ready(self) -> ObjectRef[bool]:
        return self.actor.ready.remote()

    def kill(self) -> None:
        import ray

        ray.kill(self.actor)


class RolloutHandle(Handle):
    """A `kuberlhf_workers.rollout.worker.RolloutWorker`."""

    def rollout(
        self, request: GenerationRequest
    ) -> tuple[ObjectRef[dict[str, int]], ObjectRef[GenerationResult]]:
        refs: tuple[ObjectRef[dict[str, int]], ObjectRef[GenerationResult]]
        refs = self.actor.rollout.options(num_returns=2).remote(request)
        return refs

    def join_weight_sync(self, receiver: WeightTransport) -> ObjectRef[None]:
        return self.actor.join_weight_sync.remote(receiver)

    def receive_weights(self, payload: Any = None) -> ObjectRef[None]:
        return self.actor.receive_weights.remote(payload)

    def parameters(self) -> ObjectRef[dict[str, torch.Tensor]]:
        return self.actor.parameters.remote()

    def sleep(self) -> ObjectRef[None]:
        return self.actor.sleep.remote()

    def wake_up(self) -> ObjectRef[None]:
        return self.actor.wake_up.remote()

    def pid(self) -> ObjectRef[int]:
        return self.actor.pid.remote()


class TrainerHandle(Handle):
    """A `kuberlhf_workers.training.trainer.TrainerWorker` (one DeepSpeed rank)."""

    def master_address(self) -> ObjectRef[tuple[str, int]]:
        return self.actor.master_address.remote()

    def init_world(self, master: tuple[str, int]) -> ObjectRef[None]:
        return self.actor.init_world.remote(master)

    def train(
        self,
        rollout_refs: list[ObjectRef[GenerationResult]],
        rewards: list[ObjectRef[list[float]]],
        ref_refs: list[ObjectRef[torch.Tensor]],
        value_refs: list[ObjectRef[torch.Tensor]],
        kl_coef: float | None = None,
    ) -> ObjectRef[dict[str, float]]:
        # Refs inside lists reach the actor as refs: it fetches them itself, straight from the store.
        return self.actor.train.remote(rollout_refs, rewards, ref_refs, value_refs, kl_coef)

    def values(self, rollout_refs: list[ObjectRef[GenerationResult]]) -> ObjectRef[torch.Tensor]:
        return self.actor.values.remote(rollout_refs)

    def param_meta(self) -> ObjectRef[list[ParamMeta]]:
        return self.actor.param_meta.remote()

    def sync_address(self) -> ObjectRef[tuple[str, int]]:
        return self.actor.sync_address.remote()

    def join_weight_sync(self, sender: WeightTransport) -> ObjectRef[None]:
        return self.actor.join_weight_sync.remote(sender)

    def send_weights(self) -> ObjectRef[Any]:
        return self.actor.send_weights.remote()

    def parameters(self, master: bool = False) -> ObjectRef[dict[str, torch.Tensor]]:
        return self.actor.parameters.remote(master)

    def save(self, directory: str, hf_dir: str | None) -> ObjectRef[None]:
        return self.actor.save.remote(directory, hf_dir)

    def load(self, directory: str) -> ObjectRef[None]:
        return self.actor.load.remote(directory)

    def export(self, hf_dir: str, shard_bytes: int | None = None) -> ObjectRef[None]:
        return self.actor.export.remote(hf_dir, shard_bytes)


class OfflineTrainerHandle(Handle):
    """A `kuberlhf_workers.training.offline.OfflineTrainerWorker` (one DeepSpeed rank of sft, rm, dpo)."""

    def master_address(self) -> ObjectRef[tuple[str, int]]:
        return self.actor.master_address.remote()

    def init_world(self, master: tuple[str, int]) -> ObjectRef[None]:
        return self.actor.init_world.remote(master)

    def train(self, examples: ObjectRef[list[Example]]) -> ObjectRef[dict[str, float]]:
        return self.actor.train.remote(examples)

    def evaluate(self, examples: ObjectRef[list[Example]]) -> ObjectRef[dict[str, float]]:
        return self.actor.evaluate.remote(examples)

    def save(self, directory: str, hf_dir: str | None) -> ObjectRef[None]:
        return self.actor.save.remote(directory, hf_dir)

    def load(self, directory: str) -> ObjectRef[None]:
        return self.actor.load.remote(directory)

    def export(self, hf_dir: str) -> ObjectRef[None]:
        return self.actor.export.remote(hf_dir)


class ReferenceHandle(Handle):
    """A `kuberlhf_workers.training.reference.ReferenceWorker`."""

    def master_address(self) -> ObjectRef[tuple[str, int]]:
        return self.actor.master_address.remote()

    def init_world(self, master: tuple[str, int], timeout_s: float) -> ObjectRef[None]:
        return self.actor.init_world.remote(master, timeout_s)

    def logprobs(
        self, rollout_refs: list[ObjectRef[GenerationResult]], rank: int, world: int
    ) -> ObjectRef[torch.Tensor]:
        return self.actor.logprobs.remote(rollout_refs, rank, world)


class RewardHandle(Handle):
    """A `kuberlhf_workers.rewards.worker.RewardWorker`."""

    def score(
        self,
        rollout_refs: list[ObjectRef[GenerationResult]],
        records: list[dict[str, Any]],
        samples_per_prompt: int,
        rank: int = 0,
        world: int = 1,
    ) -> ObjectRef[list[float]]:
        return self.actor.score.remote(rollout_refs, records, samples_per_prompt, rank, world)

    def scored(self) -> ObjectRef[int]:
        return self.actor.scored.remote()
