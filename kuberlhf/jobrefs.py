"""`job:<name>` model references: one stage of a pipeline names the RLHFJob whose model it uses.

`model.actor: job:tiny-sft` means "the final model of RLHFJob tiny-sft", found beside this
job's output folder: locally `runs/tiny-sft/final` next to `runs/<this job>`; in a cluster
`/checkpoints/tiny-sft/final` on the checkpoint volume both jobs share. Pure: the operator reads
the dependencies to hold a job until they succeed, `kuberlhf run` resolves them to folders.
"""

from __future__ import annotations

import re
from pathlib import Path

from kuberlhf.api import RLHFJobSpec

PREFIX = "job:"
FINAL = "final"  # the folder an RLHFJob's finished run writes its model to, under its output
_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# The spec fields that may name a model, with the sections they live in.
FIELDS = {
    "spec.model.actor": ("model", "actor"),
    "spec.model.reference": ("model", "reference"),
    "spec.model.critic": ("model", "critic"),
    "spec.model.tokenizer": ("model", "tokenizer"),
    "spec.reward.model": ("reward", "model"),
}


def job_refs(spec: RLHFJobSpec) -> dict[str, str]:
    """field → the job name it refers to, for every `job:` reference of the spec."""
    refs = {}
    for field, (section, key) in FIELDS.items():
        owner = getattr(spec, section)
        value = getattr(owner, key) if owner is not None else None
        if isinstance(value, str) and value.startswith(PREFIX):
            refs[field] = value[len(PREFIX) :]
    return refs


def dependencies(spec: RLHFJobSpec) -> list[str]:
    """The RLHFJobs this one waits for, each once, in a stable order."""
    return sorted(set(job_refs(spec).values()))


def ref_problems(spec: RLHFJobSpec, own_name: str) -> list[str]:
    """Malformed or circular references, naming the field."""
    problems = []
    for field, name in job_refs(spec).items():
        if not _NAME.match(name):
            problems.append(f"{field}: job:{name!r} must name an RLHFJob (a DNS label such as job:tiny-sft)")
        elif name == own_name:
            problems.append(f"{field}: job:{name} names this job itself; name the job whose model it uses")
    return problems


def resolve(spec: RLHFJobSpec, jobs_root: Path) -> RLHFJobSpec:
    """The spec with every `job:X` replaced by the folder `jobs_root/X/final`; a ValueError naming
    the field when that job has no final model there (yet)."""
    if not job_refs(spec):
        return spec
    updates: dict[str, dict[str, str]] = {}
    for field, name in job_refs(spec).items():
        section, key = FIELDS[field]
        folder = jobs_root / name / FINAL
        if not (folder / "config.json").is_file():
            raise ValueError(
                f"{field}: job:{name} has no final model at {folder}: run that job first (its output "
                f"must sit beside this one's, in {jobs_root})"
            )
        updates.setdefault(section, {})[key] = str(folder.resolve())
    changed = {
        section: getattr(spec, section).model_copy(update=values) for section, values in updates.items()
    }
    return spec.model_copy(update=changed)
