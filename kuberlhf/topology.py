"""Which pods exist, derived from one spec.

The operator turns `worker_groups` into KubeRay worker groups whose pods advertise Ray
custom resources (`kuberlhf.io/<role>`, one unit per GPU); the driver's placement groups
(`kuberlhf.placement`) ask for the same units, so each actor lands on the pod meant for it.
Locally the driver declares `local_resources` on its private Ray instance. Keeping both sides
in pure modules is what makes the local run and the cluster run the same program.
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


def uses_critic(spec: RLHFJobSpec) -> bool:
    return ALGORITHMS[spec.algorithm].critic


def is_online(spec: RLHFJobSpec) -> bool:
    """Online algorithms generate and score rollouts; offline ones (sft, rm, dpo) only train."""
    return ALGORITHMS[spec.algorithm].online


def uses_reference(spec: RLHFJobSpec) -> bool:
    """A reference group for the KL term (dpo keeps its reference inside the trainer ranks)."""
    return spec.kl.coef > 0


def reference_world(spec: RLHFJobSpec) -> int:
    """Reference processes: one per actor rank on the actor's GPUs, else one per GPU of its group."""
    if spec.reference.colocate_with_actor:
        return spec.actor.world_size
    return spec.reference.replicas * spec.reference.resources.slots


def reference_has_own_group(spec: RLHFJobSpec) -> bool:
    return uses_reference(spec) and not spec.reference.colocate_with_actor


def reward_has_own_group(spec: RLHFJobSpec) -> bool:
    """Model rewards score on their own pods (one reward actor per GPU); functions and URLs run in
    light reward actors that share the head."""
    return spec.reward is not None and spec.reward.model is not None


def _group(role: str, replicas: int, resources: Resources) -> WorkerGroup:
    # One unit of the role's resource per GPU (per pod on CPU): one placement bundle each.
    return WorkerGroup(role, replicas, resources, {resource_name(role): float(resources.slots)})


def worker_groups(spec: RLHFJobSpec) -> list[WorkerGroup]:
    """The RayCluster worker groups for a spec, in a stable order. Which ranks share them is
    `kuberlhf.placement`'s business."""
    if not is_online(spec):
        return [_group("actor", spec.actor.replicas, spec.actor.resources)]
    groups = []
    if spec.placement == "separate":
        groups.append(_group("rollout", spec.rollout.replicas, spec.rollout.resources))
    groups.append(_group("actor", spec.actor.replicas, spec.actor.resources))
    if uses_critic(spec):
        critic = spec.critic
        replicas = critic.replicas if critic else spec.actor.replicas
        groups.append(_group("critic", replicas, critic.resources if critic else spec.actor.resources))
    if reference_has_own_group(spec):
        groups.append(_group("reference", spec.reference.replicas, spec.reference.resources))
    if spec.reward is not None and spec.reward.model is not None:
        groups.append(_group("reward", spec.reward.replicas, spec.reward.resources))
    return groups


def local_resources(spec: RLHFJobSpec) -> dict[str, float]:
    """Custom resources a single local Ray node declares so every actor of the spec fits on it."""
    totals: dict[str, float] = {}
    for group in worker_groups(spec):
        for name, amount in group.ray_resources.items():
            totals[name] = totals.get(name, 0.0) + amount * group.replicas
    return totals
