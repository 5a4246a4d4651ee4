"""Ray actor groups, seated where `kuberlhf.placement` says: one placement group per pod group,
one bundle per GPU, rank i of each role hosted there on bundle i with its share of the GPU.

Actors ask for no CPUs (num_cpus=0): on a 2-core laptop the rollout engine, the trainers and
the reference take turns, and what keeps them apart in a cluster is the pod group's custom
resource (`kuberlhf.io/<group>`), which only that group's pods advertise.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from kuberlhf.api import RLHFJobSpec
from kuberlhf.placement import Plan
from kuberlhf.seats import Seat, bundles
from kuberlhf_workers.control.handles import Handle

if TYPE_CHECKING:
    from ray.actor import ActorHandle

H = TypeVar("H", bound=Handle)


class Placements:
    """The Ray placement groups of one job: one per pod group of the plan, one bundle per GPU,
    created on first use and removed by `remove`."""

    def __init__(self, plan: Plan, job_name: str):
        self.plan = plan
        self.bundles = bundles(plan)
        self.job_name = job_name
        self.created: dict[str, Any] = {}

    def get(self, group: str) -> Any:
        import ray
        from ray.util.placement_group import placement_group

        if group not in self.created:
            name = f"{self.job_name}-{group}-{os.getpid()}"
            self.created[group] = placement_group(self.bundles[group], strategy="PACK", name=name)
            ray.get(self.created[group].ready(), timeout=600)
        return self.created[group]

    def remove(self) -> None:
        import ray

        for group in self.created.values():
            ray.util.remove_placement_group(group)
        self.created.clear()


@dataclass
class ActorGroup(Generic[H]):
    """A role's actors (behind their typed handles), each in its seat, and what it takes to start
    rank i again in the same seat (a dead rollout engine is replaced in place)."""

    worker_cls: type
    seats: list[Seat]
    placements: Placements
    args_for: Callable[[int], tuple[Any, ...]]
    handle: Callable[[ActorHandle, int], H]  # (actor, rank) -> typed handle
    actors: list[H] = field(default_factory=list)

    def spawn(self, i: int) -> H:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        seat = self.seats[i]
        options: dict[str, Any] = {"num_cpus": 0, "num_gpus": seat.gpus, "resources": seat.resources}
        if seat.group is not None and seat.bundle is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self.placements.get(seat.group),
                placement_group_bundle_index=seat.bundle,
                # A tensor-parallel vLLM engine starts its workers inside the same placement group.
                placement_group_capture_child_tasks=bool(seat.env),
            )
        if seat.env:
            options["runtime_env"] = {"env_vars": seat.env}
        remote_cls: Any = ray.remote(self.worker_cls)  # Ray's stubs cannot follow a class made remote
        actor: ActorHandle = remote_cls.options(**options).remote(*self.args_for(i))
        return self.handle(actor, i)

    def replace(self, i: int) -> H:
        self.actors[i] = self.spawn(i)
        return self.actors[i]


def start_group(
    worker_cls: type,
    seats: list[Seat],
    placements: Placements,
    args_for: Callable[[int], tuple[Any, ...]],
    handle: Callable[[ActorHandle, int], H],
) -> ActorGroup[H]:
    """One actor of `worker_cls` per seat; `args_for(i)` gives rank i's constructor arguments."""
    actor_group = ActorGroup(worker_cls, seats, placements, args_for, handle)
    actor_group.actors = [actor_group.spawn(i) for i in range(len(seats))]
    return actor_group


def threads_per_actor(spec: RLHFJobSpec, local: bool) -> int:
    """Torch threads per actor. Locally the roles take turns on the same cores, so each gets all of
    them divided among a group's ranks (which run at the same time); in async mode generation and
    training overlap, so they split the cores (oversubscribed OpenMP threads spin against each
    other). 0 leaves torch's default."""
    if not local:
        return 0
    cores = len(os.sched_getaffinity(0))
    busiest = max(spec.actor.world_size, spec.rollout.replicas, spec.critic.world_size if spec.critic else 1)
    overlapping = 2 if spec.rollout.off_policy_steps > 0 else 1
    return max(1, cores // (busiest * overlapping))
