"""Kubernetes resource quantities ("8Gi", "500m", "2"): checked before they reach the API server.

The RLHFJob API keeps quantities as plain strings, so a typo such as "8GB" would only fail
when KubeRay creates pods, far from the user. Checking here lets the operator (and
`kuberlhf render`) name the exact field and the fix.
"""

from __future__ import annotations

import re
from decimal import Decimal

from kuberlhf.api import RLHFJobSpec, SpecError
from kuberlhf.topology import WorkerGroup, worker_groups

_QUANTITY = re.compile(
    r"^\+?(?P<number>\d+(\.\d*)?|\.\d+)(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][-+]?\d+)?$"
)
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "k": Decimal(10**3),
            "M": Decimal(10**6), "G": Decimal(10**9), "T": Decimal(10**12), "P": Decimal(10**15),
            "E": Decimal(10**18)}


def parse_quantity(text: str) -> Decimal:
    """The value of a quantity in base units (bytes, cores); ValueError when it is not one."""
    match = _QUANTITY.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a Kubernetes quantity")
    number = Decimal(match["number"])
    suffix = match["suffix"] or ""
    if suffix in _BINARY:
        return number * _BINARY[suffix]
    if suffix in _DECIMAL:
        return number * _DECIMAL[suffix]
    if suffix:
        return number * Decimal(10) ** int(suffix[1:])
    return number


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
    return _problem(f"{field}.cpu", group.resources.cpu, "8 or 500m") + _problem(
        f"{field}.memory", group.resources.memory, "64Gi"
    )


def quantity_problems(spec: RLHFJobSpec) -> list[str]:
    problems = [p for group in worker_groups(spec) for p in _group_problems(spec, group)]
    if spec.checkpoint.volume.claim_name is None:
        problems += _problem("spec.checkpoint.volume.size", spec.checkpoint.volume.size, "500Gi")
    # A critic without its own section borrows the actor's resources: report that field once.
    return list(dict.fromkeys(problems))


def check_quantities(spec: RLHFJobSpec) -> None:
    """Raise SpecError naming every quantity Kubernetes would reject."""
    problems = quantity_problems(spec)
    if problems:
        raise SpecError(problems)


def shm_size(memory: str, fraction: int = 4) -> str:
    """A /dev/shm size limit: a share of the pod's memory, since memory-backed emptyDirs count against it."""
    mebibytes = int(parse_quantity(memory) / fraction / _BINARY["Mi"])
    return f"{max(mebibytes, 1)}Mi"
