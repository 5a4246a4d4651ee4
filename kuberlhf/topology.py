"""Which pods exist and which Ray actors land on them, derived from one spec.

The operator turns `worker_groups` into KubeRay worker groups whose pods advertise Ray
custom resources; the driver asks for the same resources in `actor_requests`, so each
actor lands on the pod meant for it. Locally the driver declares `local_resources` on
its private Ray instance. Keeping both sides in one pure module is what makes the
local run and the cluster run the same program.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kuberlhf.api import ALGORITHMS, Resources, RLHFJobSpec

ROLES = ("rollout", "actor", "critic", "reference", "reward")


def resource_name(role: str) -> str:
    """The Ray custom resource a pod of `role` advertises (one unit per actor slot)."""
    return f"kuberlhf.io/{role}"


@dataclass(frozen=True)
class WorkerGroup:
    """One KubeRay worker group: `replicas` identical pods."""

    role: str
    replicas: int
    resources: Resources
    ray_resources: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ActorRequest:
    """What each of `count` Ray actors of a role asks for (used with placement groups)."""

    role: str
    count: int
    gpus: float
    ray_resources: dict[str, float]

    def bundle(self) -> dict[str, float]:
        """A placement-group bundle for one actor of this role."""
        bundle = dict(self.ray_resources)
        if self.gpus:
            bundle["GPU"] = self.gpus
        return bundle


def uses_critic(spec: RLHFJobSpec) -> bool:
    return ALGORITHMS[spec.algorithm].critic


def uses_reference(spec: RLHFJobSpec) -> bool:
    return spec.kl.coef > 0


def reference_has_own_group(spec: RLHFJobSpec) -> bool:
    return uses_reference(spec) and not spec.reference.colocate_with_actor


def reward_has_own_group(spec: RLHFJobSpec) -> bool:
    """Model rewards run reward servers on their own pods; functions and URLs run in the driver's
    reward actors, which are light and share the head."""
    return spec.reward.model is not None


def _colocated_share(spec: RLHFJobSpec) -> int:
    """How many roles take turns on each actor GPU (OpenRLHF's hybrid engine)."""
    share = 1
    if spec.placement == "colocate":
        share += 1
    if uses_reference(spec) and spec.reference.colocate_with_actor:
        share += 1
    return share


def worker_groups(spec: RLHFJobSpec) -> list[WorkerGroup]:
    """The RayCluster worker groups for a spec, in a stable order."""
    share = _colocated_share(spec)
    actor_slots = float(share)
    groups = []
    if spec.placement == "separate":
        groups.append(
            WorkerGroup("rollout", spec.rollout.replicas, spec.rollout.resources,
                        {resource_name("rollout"): 1.0})
        )
    groups.append(
        WorkerGroup("actor", spec.actor.replicas, spec.actor.resources, {resource_name("actor"): actor_slots})
    )
    if uses_critic(spec):
        critic = spec.critic
        replicas = critic.replicas if critic else spec.actor.replicas
        resources = critic.resources if critic else spec.actor.resources
        groups.append(WorkerGroup("critic", replicas, resources, {resource_name("critic"): 1.0}))
    if reference_has_own_group(spec):
        groups.append(
            WorkerGroup("reference", spec.reference.replicas, spec.reference.resources,
                        {resource_name("reference"): 1.0})
        )
    if reward_has_own_group(spec):
        groups.append(
            WorkerGroup("reward", spec.reward.replicas, spec.reward.resources, {resource_name("reward"): 1.0})
        )
    return groups


def actor_requests(spec: RLHFJobSpec) -> dict[str, ActorRequest]:
    """The Ray actors the driver creates per role, and what each one asks for."""
    share = _colocated_share(spec)
    actor_gpus = spec.actor.resources.gpus / share if spec.actor.resources.gpus else 0.0
    requests: dict[str, ActorRequest] = {}
    if spec.placement == "colocate":
        # A single-GPU engine takes its turn on a trainer's GPU; a tensor-parallel vLLM engine
        # asks for nothing itself and places its TP workers on the actor GPUs through Ray.
        single_gpu = spec.rollout.tensor_parallel_size == 1 and spec.rollout.resources.gpus > 0
        requests["rollout"] = ActorRequest(
            "rollout", spec.rollout.replicas, 1.0 / share if single_gpu else 0.0,
            {resource_name("actor"): 1.0},
        )
    else:
        requests["rollout"] = ActorRequest(
            "rollout", spec.rollout.replicas, float(spec.rollout.resources.gpus),
            {resource_name("rollout"): 1.0},
        )
    requests["actor"] = ActorRequest("actor", spec.actor.replicas, actor_gpus, {resource_name("actor"): 1.0})
    if uses_critic(spec):
        critic = spec.critic
        replicas = critic.replicas if critic else spec.actor.replicas
        gpus = (critic.resources if critic else spec.actor.resources).gpus
        requests["critic"] = ActorRequest("critic", replicas, float(gpus), {resource_name("critic"): 1.0})
    if uses_reference(spec):
        if spec.reference.colocate_with_actor:
            requests["reference"] = ActorRequest(
                "reference", spec.actor.replicas, actor_gpus, {resource_name("actor"): 1.0}
            )
        else:
            requests["reference"] = ActorRequest(
                "reference", spec.reference.replicas, float(spec.reference.resources.gpus),
                {resource_name("reference"): 1.0},
            )
    if reward_has_own_group(spec):
        requests["reward"] = ActorRequest(
            "reward", spec.reward.replicas, float(spec.reward.resources.gpus), {resource_name("reward"): 1.0}
        )
    return requests


def local_resources(spec: RLHFJobSpec) -> dict[str, float]:
    """Custom resources a single local Ray node declares so every actor of the spec fits on it."""
    totals: dict[str, float] = {}
    for group in worker_groups(spec):
        for name, amount in group.ray_resources.items():
            totals[name] = totals.get(name, 0.0) + amount * group.replicas
    return totals
