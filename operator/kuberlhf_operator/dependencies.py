"""Pipelines: an RLHFJob whose models are other RLHFJobs' (`job:<name>`) waits for them (pure).

A later stage of SFT → RM → RL can be applied together with the earlier ones: the operator holds
it Pending with a DependenciesReady=False condition naming what it waits for, launches it when
every job it names has Succeeded, and fails it, saying why, when one failed or does not exist.
The model travels on the checkpoint volume, so both jobs must mount the same claim.
"""

from __future__ import annotations

from dataclasses import dataclass

from kuberlhf.api import RLHFJob
from kuberlhf.jobrefs import job_refs
from kuberlhf.kube import Obj
from kuberlhf_operator.names import checkpoint_claim

CONDITION = "DependenciesReady"


@dataclass(frozen=True)
class Verdict:
    ready: bool  # launch now
    failed: bool  # never will: the job fails
    reason: str
    message: str


def _claim_of(dependency: Obj) -> str:
    spec = dependency.get("spec") or {}
    volume = (spec.get("checkpoint") or {}).get("volume") or {}
    return str(volume.get("claimName") or f"{dependency['metadata']['name']}-checkpoints")


def verdict(job: RLHFJob, found: dict[str, Obj | None]) -> Verdict:
    """What to do with `job` given the RLHFJobs it names (`found[name]` None: no such job)."""
    by_job: dict[str, list[str]] = {}
    for field, name in job_refs(job.spec).items():
        by_job.setdefault(name, []).append(field)
    waiting = []
    for name, fields in sorted(by_job.items()):
        named_by = f"named by {', '.join(fields)}"
        dependency = found.get(name)
        if dependency is None:
            return Verdict(False, True, "DependencyNotFound",
                           f"RLHFJob {name} ({named_by}) does not exist in this namespace: create it, then "
                           "recreate this job, or fix the name")
        phase = (dependency.get("status") or {}).get("phase") or "Pending"
        if phase == "Failed":
            return Verdict(False, True, "DependencyFailed",
                           f"RLHFJob {name} ({named_by}) failed, so its model will never exist: fix and "
                           "rerun it, then recreate this job")
        mine, theirs = checkpoint_claim(job), _claim_of(dependency)
        if mine != theirs:
            return Verdict(False, True, "DependencyOnAnotherVolume",
                           f"RLHFJob {name} ({named_by}) writes its model to volume {theirs} but this job "
                           f"mounts {mine}: set spec.checkpoint.volume.claimName of both jobs to one "
                           "ReadWriteMany claim")
        if phase != "Succeeded":
            waiting.append(f"{name} ({phase})")
    if waiting:
        return Verdict(False, False, "WaitingForDependency",
                       f"waiting for RLHFJob {', '.join(waiting)} to succeed")
    return Verdict(True, False, "DependenciesSucceeded",
                   f"every job it uses has succeeded: {', '.join(sorted(by_job))}")
