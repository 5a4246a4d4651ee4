"""Ray actor groups: one PACK placement group per role, built from `kuberlhf.topology`.

Actors ask for no CPUs (num_cpus=0): on a 2-core laptop the rollout engine, the trainers and
the reference take turns, and what keeps them apart in a cluster is the role's custom
resource (`kuberlhf.io/<role>`), which only that role's pods advertise.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kuberlhf.api import RLHFJobSpec
from kuberlhf.topology import ActorRequest


@dataclass
class ActorGroup:
    """A role's actors and what it takes to start rank i again on its own bundle (a dead rollout
    engine is replaced in place)."""

    remote_cls: Any
    request: ActorRequest
    placement: Any
    args_for: Callable[[int], tuple[Any, ...]]
    actors: list[Any] = field(default_factory=list)

    def spawn(self, i: int) -> Any:
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
        return self.remote_cls.options(**options).remote(*self.args_for(i))

    def replace(self, i: int) -> Any:
        self.actors[i] = self.spawn(i)
        return self.actors[i]


def start_group(
    cls: type, request: ActorRequest, name: str, args_for: Callable[[int], tuple[Any, ...]], groups: list[Any]
) -> ActorGroup:
    """`request.count` actors of `cls`, each on its own bundle; `args_for(i)` gives rank i's args.
    The placement group is appended to `groups`, for the caller to remove."""
    import ray
    from ray.util.placement_group import placement_group

    bundle = request.bundle()
    group = None
    if bundle:
        group = placement_group([bundle] * request.count, strategy="PACK", name=f"{name}-{os.getpid()}")
        groups.append(group)
        ray.get(group.ready(), timeout=600)
    actor_group = ActorGroup(ray.remote(cls), request, group, args_for)
    actor_group.actors = [actor_group.spawn(i) for i in range(request.count)]
    return actor_group


def create_group(
    cls: type, request: ActorRequest, name: str, args_for: Callable[[int], tuple[Any, ...]], groups: list[Any]
) -> list[Any]:
    """The actors of `start_group`, for roles that are never replaced."""
    return start_group(cls, request, name, args_for, groups).actors


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


class RewardWorker:
    """Scores completions with the spec's reward (loaded once per actor)."""

    def __init__(self, spec: RLHFJobSpec, spec_dir: str):
        from kuberlhf.workers import rewards

        token = os.environ.get("KUBERLHF_REWARD_TOKEN")
        self.fn = rewards.make_reward_fn(spec.reward, Path(spec_dir), token)

    def ready(self) -> bool:
        return True

    def score(
        self, rollout_refs: list[Any], records: list[dict[str, Any]], samples_per_prompt: int
    ) -> list[float]:
        import ray
        from kuberlhf.workers import rewards
        from kuberlhf.workers.batch import merge_results

        result = merge_results(ray.get(rollout_refs))
        per_sample = [r for r in records for _ in range(samples_per_prompt)]
        keys = sorted({k for r in records for k in r if k != "prompt"})
        extra = {k: [r.get(k) for r in per_sample] for k in keys}
        return rewards.score(self.fn, result.prompts, result.responses, extra)
