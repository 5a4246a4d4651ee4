"""Checkpoint folders, the atomic `latest` pointer and retention.

Layout under the checkpoint root:

    latest                  text file naming the newest complete checkpoint (replaced atomically)
    step-000010/
      state.json            step, total steps, sampler position, seed, time
      rollouts-ahead.json   with rollout.offPolicySteps: rollouts already generated for later steps
      model/                the actor as HF save_pretrained + tokenizer (usable on its own)
      deepspeed/            DeepSpeed checkpoints, tags "actor" and "critic" (optimizer included)

A checkpoint becomes visible only when `latest` points at it, and `latest` is written last,
so a crash mid-save leaves the previous checkpoint in charge.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kuberlhf.api import RLHFJob, RLHFJobSpec, spec_to_dict
from kuberlhf_workers.base.precision import resolve_cpu_run

LATEST = "latest"
DEFAULT_FOLDER = "checkpoints"  # under the run's output folder, unless spec.checkpoint.path says otherwise
# The spec fields that shape what is trained: a checkpoint resumes only into a job that agrees on
# all of them. Length (schedule), placement, resources and cluster settings may change.
SHAPING_FIELDS: dict[str, tuple[str, ...] | None] = {
    "algorithm": None,
    "model": ("actor", "reference", "critic", "tokenizer"),
    "reward": ("function", "model", "url", "overlong"),
    "environment": None,
    "data": ("prompts", "promptKey", "maxPromptTokens", "maxNewTokens", "shuffle", "train", "maxLength",
             "chatTemplate", "promptMix", "maxSamples"),
    "rollout": ("samplesPerPrompt", "promptsPerStep", "temperature", "topP", "offPolicySteps",
                "dynamicSampling"),
    "actor": ("learningRate", "globalBatchSize", "epochs", "maxGradNorm", "lora"),
    "critic": ("learningRate", "globalBatchSize", "epochs", "maxGradNorm"),
    "kl": None,
    "loss": None,
    "dpo": None,
    "seed": None,
    "precision": None,  # DeepSpeed's bf16 and fp32 optimizer states are not interchangeable
}
AHEAD = "rollouts-ahead.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class JobIdentity:
    """Which job wrote a checkpoint: its name and a fingerprint of the fields that shape training."""

    name: str
    fingerprint: str


def training_fingerprint(spec: RLHFJobSpec) -> str:
    """A short hash of `SHAPING_FIELDS` of the spec (defaults filled in, so spelling them out or
    leaving them to their defaults gives the same fingerprint; so does `precision: auto` and what it
    becomes on this machine's CPUs)."""
    full = spec_to_dict(resolve_cpu_run(spec)[0])
    picked = {}
    for key, subkeys in SHAPING_FIELDS.items():
        value = full.get(key)
        picked[key] = {k: value.get(k) for k in subkeys} if subkeys and isinstance(value, dict) else value
    canonical = json.dumps(picked, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def job_identity(job: RLHFJob) -> JobIdentity:
    return JobIdentity(job.metadata.name, training_fingerprint(job.spec))


@dataclass(frozen=True)
class TrainingState:
    """What the driver needs, besides the trainers' weights, to continue exactly where it stopped."""

    step: int
    total_steps: int
    sampler: dict[str, int]
    seed: int
    extra: dict[str, Any] = field(default_factory=dict)
    job: JobIdentity | None = None  # None only in checkpoints of kuberlhf before 2026-12


def resume_problem(directory: Path, state: TrainingState, mine: JobIdentity) -> str | None:
    """Why this job must not resume `directory` (another job's checkpoint, or its spec changed what
    is trained), naming both jobs and the way out; None when it may."""
    fix = "run with --no-resume to start over there, or give this job its own --output or checkpoint.path"
    if state.job is None:
        return f"checkpoint {directory} does not say which job wrote it (an older kuberlhf); {fix}"
    if state.job.name != mine.name:
        return (f"checkpoint {directory} belongs to job {state.job.name!r}, not to this job {mine.name!r}; "
                f"{fix}")
    if state.job.fingerprint != mine.fingerprint:
        return (f"checkpoint {directory} of job {mine.name!r} was trained with a different spec "
                f"(fingerprint {state.job.fingerprint}, now {mine.fingerprint}: the algorithm, models, "
                f"reward, environment, data, sampling, optimizer, LoRA, KL, loss, precision or seed "
                f"changed); {fix}")
    return None


def resumable(root: Path, resume: bool, mine: JobIdentity) -> tuple[Path, TrainingState] | None:
    """The newest checkpoint under `root` to resume and its state (None: none, or resume is off);
    a ValueError when it is another job's or the spec changed what is trained."""
    directory = latest(root) if resume else None
    if directory is None:
        return None
    state = read_state(directory)
    problem = resume_problem(directory, state, mine)
    if problem is not None:
        raise ValueError(problem)
    return directory, state


def resolve_root(path: str | None, output_dir: Path) -> Path:
    """Where checkpoints go: `spec.checkpoint.path` when set (relative to the run's output folder
    unless absolute), else `<output>/checkpoints` — so nothing lands outside the output folder
    unless the spec asks for it."""
    if path is None:
        return output_dir / DEFAULT_FOLDER
    p = Path(path)
    return p if p.is_absolute() else output_dir / p


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def write_state(directory: Path, state: TrainingState) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "state.json").write_text(json.dumps(asdict(state), indent=2))


def read_state(directory: Path) -> TrainingState:
    data = json.loads((directory / "state.json").read_text())
    job = data.pop("job", None)
    return TrainingState(**data, job=JobIdentity(**job) if job else None)


def write_rollouts_ahead(directory: Path, rollouts: list[dict[str, Any]]) -> None:
    """Rollouts generated for steps after this checkpoint (async pipelining), as JSON: a resumed
    run trains on exactly the samples an unbroken one would have, which came from older weights
    than the checkpoint holds and could not be generated again."""
    (directory / AHEAD).write_text(json.dumps(rollouts))


def read_rollouts_ahead(directory: Path) -> list[dict[str, Any]]:
    path = directory / AHEAD
    return list(json.loads(path.read_text())) if path.is_file() else []


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def publish(root: Path, directory: Path, keep: int) -> None:
    """Point `latest` at `directory`, then delete all but the newest `keep` checkpoints."""
    _atomic_write(root / LATEST, directory.name + "\n")
    for old in list_checkpoints(root)[:-keep]:
        if old != directory:
            shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest(root: Path) -> Path | None:
    """The checkpoint `latest` names, or None when there is none; a dangling pointer is an error."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    directory = root / pointer.read_text().strip()
    if not (directory / "state.json").is_file():
        raise FileNotFoundError(
            f"{pointer} names {directory.name}, which is missing or incomplete; "
            "delete the pointer to start over, or restore the folder"
        )
    return directory
