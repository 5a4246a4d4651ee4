"""Ray actor groups: one PACK placement group per role, built from `kuberlhf.topology`.

Actors ask for no CPUs (num_cpus=0): on a 2-core laptop the rollout engine, the trainers and
the reference take turns, and what keeps them apart in a cluster is the role's custom
resource (`kuberlhf.io/<role>`), which only that role's pods advertise.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from kuberlhf.api import RLHFJobSpec
from kuberlhf.topology import ActorRequest
from kuberlhf_workers.control.handles import Handle

if TYPE_CHECKING:
    from ray.actor import ActorHandle

H = TypeVar("H", bound=Handle)


@dataclass
class ActorGroup(Generic[H]):
    """A role's actors (behind their typed handles) and what it takes to start rank i again on its
    own bundle (a dead rollout engine is replaced in place)."""

    worker_cls: type
    request: ActorRequest
    placement: Any  # a Ray PlacementGroup, or None when the role asks for no bundle resources
    args_for: Callable[[int], tuple[Any, ...]]
    handle: Callable[[ActorHandle, int], H]  # (actor, rank) -> typed handle
    actors: list[H] = field(default_factory=list)

    def spawn(self, i: int) -> H:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        options: dict[str, Any] = {
            "num_cpus": 0,
            "num_gpus": self.request.gpus,
            "resources": self.request.ray_resources,
        }
        if self.placement is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self.placement, placement_group_bundle_index=i
            )
        remote_cls: Any = ray.remote(self.worker_cls)  # Ray's stubs cannot follow a class made remote
        actor: ActorHandle = remote_cls.options(**options).remote(*self.args_for(i))
        return self.handle(actor, i)

    def replace(self, i: int) -> H:
        self.actors[i] = self.spawn(i)
        return self.actors[i]


def start_group(
    worker_cls: type,
    request: ActorRequest,
    name: str,
    args_for: Callable[[int], tuple[Any, ...]],
    handle: Callable[[ActorHandle, int], H],
    groups: list[Any],
) -> ActorGroup[H]:
    """`request.count` actors of `worker_cls`, each on its own bundle; `args_for(i)` gives rank i's
    args. The placement group is appended to `groups`, for the caller to remove."""
    import ray
    from ray.util.placement_group import placement_group

    bundle = request.bundle()
    group = None
    if bundle:
        group = placement_group([bundle] * request.count, strategy="PACK", name=f"{name}-{os.getpid()}")
        groups.append(group)
        ray.get(group.ready(), timeout=600)
    actor_group = ActorGroup(worker_cls, request, group, args_for, handle)
    actor_group.actors = [actor_group.spawn(i) for i in range(request.count)]
    return actor_group


def threads_per_actor(spec: RLHFJobSpec, local: bool) -> int:
    """Torch threads per actor. Locally the roles take turns on the same cores, so each gets all of
    them divided among a group's ranks (which run at the same time); in async mode generation and
    training overlap, so they split the cores (oversubscribed OpenMP threads spin against each
    other). 0 leaves torch's default."""
    if not local:
        return 0
    cores = len(os.sched_getaffinity(0))
    busiest = max(spec.actor.replicas, spec.rollout.replicas, spec.critic.replicas if spec.critic else 1)
    overlapping = 2 if spec.rollout.off_policy_steps > 0 else 1
    return max(1, cores // (busiest * overlapping))
