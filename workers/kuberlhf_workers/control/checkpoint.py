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

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

LATEST = "latest"
AHEAD = "rollouts-ahead.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class TrainingState:
    """What the driver needs, besides the trainers' weights, to continue exactly where it stopped."""

    step: int
    total_steps: int
    sampler: dict[str, int]
    seed: int
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_root(path: str, output_dir: Path) -> Path:
    """checkpoint.path, relative to the run's output folder unless absolute."""
    p = Path(path)
    return p if p.is_absolute() else output_dir / p


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def write_state(directory: Path, state: TrainingState) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "state.json").write_text(json.dumps(asdict(state), indent=2))


def read_state(directory: Path) -> TrainingState:
    data = json.loads((directory / "state.json").read_text())
    return TrainingState(**data)


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
