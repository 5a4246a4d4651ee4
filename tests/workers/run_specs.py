"""Small RLHFJob specs and a shared local Ray for the training-program tests (real Ray, DeepSpeed, models)."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from kuberlhf.api import RLHFJob, parse_job

REPO = Path(__file__).resolve().parents[2]
RESOURCES = {f"kuberlhf.io/{role}": 8.0 for role in ("rollout", "actor", "critic", "reference", "reward")}


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def job_dict(model_dir: Path, name: str = "run-test", **spec: Any) -> dict[str, Any]:
    """GRPO on the digits toy reward: 8 prompts x 4 samples x 16 new tokens per step."""
    base = {
        "algorithm": "grpo",
        "model": {"actor": str(model_dir)},
        "reward": {"function": "digits.py:reward"},
        "data": {"prompts": "builtin:toy", "maxNewTokens": 16},
        "rollout": {"engine": "hf", "samplesPerPrompt": 4, "promptsPerStep": 8},
        "actor": {"zeroStage": 2, "learningRate": 3e-3, "microBatchSize": 16},
        "kl": {"coef": 0.0},
        "schedule": {"steps": 4},
        "checkpoint": {"path": "checkpoints", "everySteps": 100},
    }
    return {
        "apiVersion": "kuberlhf.io/v1alpha1",
        "kind": "RLHFJob",
        "metadata": {"name": name},
        "spec": _merge(base, spec),
    }


def write_spec(folder: Path, model_dir: Path, **spec: Any) -> Path:
    """The spec file plus the reward function it names, as a user would lay them out."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "examples" / "rewards" / "digits.py", folder / "digits.py")
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job_dict(model_dir, **spec)))
    return path


def load(path: Path) -> RLHFJob:
    return parse_job(yaml.safe_load(path.read_text()))


def local_ray() -> Iterator[None]:
    """A private Ray for one test module, with every role's custom resource declared."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, resources=RESOURCES, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
