"""Kubernetes resource quantities ("8Gi", "500m", "2"): checked before they reach the API server.

The RLHFJob API keeps quantities as plain strings, so a typo such as "8GB" would only fail
when KubeRay creates pods, far from the user. Checking here lets the operator (and
`kuberlhf render`) name the exact field and the fix.
"""

from __future__ import annotations

from kuberlhf.api import RLHFJobSpec, SpecError
from kuberlhf.quantity import parse_quantity
from kuberlhf.topology import WorkerGroup, worker_groups


def resources_field(spec: RLHFJobSpec, role: str) -> str:
    """The spec field a worker group's resources come from, for error messages."""
    if role == "critic" and spec.critic is None:
        return "spec.actor.resources"
    return f"spec.{role}.resources"


def _problem(field: str, value: str, example: str) -> list[str]:
    try:
        parse_quantity(value)
    except ValueError:
        return [f"{field}: {value!r} is not a Kubernetes quantity (for example {example!r})"]
    return []


def _group_problems(spec: RLHFJobSpec, group: WorkerGroup) -> list[str]:
    field = resources_field(spec, group.role)
    problems = _problem(f"{field}.cpu", group.resources.cpu, "8 or 500m") + _problem(
        f"{field}.memory", group.resources.memory, "64Gi"
    )
    if group.resources.gpu_memory is not None:
        problems += _problem(f"{field}.gpuMemory", group.resources.gpu_memory, "80Gi")
    return problems


def quantity_problems(spec: RLHFJobSpec) -> list[str]:
    problems = [p for group in worker_groups(spec) for p in _group_problems(spec, group)]
    if spec.checkpoint.volume.claim_name is None:
        problems += _problem("spec.checkpoint.volume.size", spec.checkpoint.volume.size, "500Gi")
    if spec.model_cache.size is not None:
        problems += _problem("spec.modelCache.size", spec.model_cache.size, "200Gi")
    # A critic without its own section borrows the actor's resources: report that field once.
    return list(dict.fromkeys(problems))


def check_quantities(spec: RLHFJobSpec) -> None:
    """Raise SpecError naming every quantity Kubernetes would reject."""
    problems = quantity_problems(spec)
    if problems:
        raise SpecError(problems)


def shm_size(memory: str, fraction: int = 4) -> str:
    """A /dev/shm size limit: a share of the pod's memory, since memory-backed emptyDirs count against it."""
    mebibytes = int(parse_quantity(memory) / fraction / 2**20)
    return f"{max(mebibytes, 1)}Mi"
