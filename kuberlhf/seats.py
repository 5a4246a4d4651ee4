"""The plan as the driver uses it: one Ray placement group per pod group and one seat per actor.

Pure, like the plan it reads; `kuberlhf_workers.control.groups` turns it into Ray calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kuberlhf import topology
from kuberlhf.api import RLHFJobSpec
from kuberlhf.placement import Plan, Rank, Role, host_group


@dataclass(frozen=True)
class Seat:
    """Where the driver starts one Ray actor: a bundle of its pod group's placement group (None:
    anywhere, no placement group) and the share of that bundle's GPU and role resource it takes.
    `env` tells a tensor-parallel vLLM engine which bundles its workers take."""

    group: str | None
    bundle: int | None
    gpus: float
    resources: dict[str, float]
    env: dict[str, str] = field(default_factory=dict)


def bundles(plan: Plan) -> dict[str, list[dict[str, float]]]:
    """Per pod group, its placement group: one bundle per GPU (per pod on CPU), in pod order."""
    out: dict[str, list[dict[str, float]]] = {}
    for pod in plan.pods:
        unit = {topology.resource_name(pod.group): 1.0} | ({"GPU": 1.0} if pod.gpus else {})
        out.setdefault(pod.group, []).extend(dict(unit) for _ in range(pod.slots))
    return out


def seats_for(plan: Plan, spec: RLHFJobSpec, role: Role) -> list[Seat]:
    """One seat per Ray actor of `role`, in rank order (per engine for the rollout)."""
    host = host_group(spec, role)
    ranks = plan.ranks_of(role)
    if host is None:  # light workers (a reward function's or client's), anywhere
        replicas = spec.reward.replicas if spec.reward is not None and role == "reward" else 0
        return [Seat(None, None, 0.0, {}) for _ in range(replicas)]
    share_of = {r.bundle: r.share for r in ranks}

    def seat(r: Rank, gpus: float, env: dict[str, str] | None = None) -> Seat:
        return Seat(host, r.bundle, gpus, {topology.resource_name(host): r.share}, env or {})

    if role != "rollout":
        return [seat(r, r.share if r.gpu is not None else 0.0) for r in ranks]
    out = []
    for engine in range(spec.rollout.replicas):
        workers = [r for r in ranks if r.engine == engine]
        first = workers[0]
        if len(workers) == 1:
            out.append(seat(first, first.share if first.gpu is not None else 0.0))
            continue
        # vLLM's Ray executor starts one worker per bundle named here, each taking its share of a GPU;
        # the engine actor itself holds none.
        env = {
            "VLLM_RAY_BUNDLE_INDICES": ",".join(str(w.bundle) for w in workers),
            "VLLM_RAY_PER_WORKER_GPUS": f"{share_of[first.bundle]:g}",
        }
        out.append(seat(first, 0.0, env))
    return out
