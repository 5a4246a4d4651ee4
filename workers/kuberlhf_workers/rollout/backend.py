"""The one interface every rollout backend implements, and the table that names them.

The rollout actor only ever talks to a `GenerationBackend`, so swapping transformers' generate
for vLLM changes no training code, and weight sync needs one entry point: `load_weights`. A new
backend is a module with a class and a line in `BACKENDS` (plus its name in the API's
`RolloutEngine`, and a rule in `kuberlhf.engine_choice` for when `auto` picks it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import torch

from kuberlhf.api import EngineName, RLHFJobSpec, sequence_tokens
from kuberlhf.engine_choice import resolved_engine
from kuberlhf_workers.base.attention import cpu_attention
from kuberlhf_workers.base.engine_transports import engine_backend
from kuberlhf_workers.base.precision import compute_dtype
from kuberlhf_workers.base.samples import GenerationRequest, GenerationResult


class GenerationBackend(Protocol):
    """A rollout engine living in one Ray actor."""

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Sample completions with the current weights."""
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the engine's weights (HF parameter names, full unsharded tensors)."""
        ...

    def named_parameters(self) -> Iterable[tuple[str, torch.Tensor]]:
        """The engine's current weights under HF names (for checks and tests)."""
        ...

    def sleep(self) -> None:
        """Give GPU memory back while a colocated trainer trains (a no-op where there is none)."""
        ...

    def wake_up(self) -> None:
        """Take the memory back before weights load and generation resumes."""
        ...


BackendFactory = Callable[[RLHFJobSpec, str | Path, torch.device], GenerationBackend]


def _hf(spec: RLHFJobSpec, model_path: str | Path, device: torch.device) -> GenerationBackend:
    from kuberlhf_workers.rollout.hf import HFBackend

    attention = cpu_attention(device, sequence_tokens(spec))
    return HFBackend(model_path, device, compute_dtype(spec.precision, device), attention)


def _vllm(spec: RLHFJobSpec, model_path: str | Path, device: torch.device) -> GenerationBackend:
    try:
        from kuberlhf_workers.rollout.vllm_engine import VLLMBackend
    except ImportError as exc:
        raise RuntimeError(
            f"spec.rollout.engine: vllm is not usable here ({exc}); install the 'cpu' or 'gpu' "
            "extra, or set rollout.engine: hf"
        ) from exc
    return VLLMBackend(
        str(model_path),
        tensor_parallel_size=spec.rollout.tensor_parallel_size,
        gpu_memory_utilization=spec.rollout.gpu_memory_utilization,
        seed=spec.seed,
        max_model_len=sequence_tokens(spec),
        sleep_between_rollouts=sleeps_between_rollouts(spec),
        weight_transfer_backend=engine_backend(spec),
        # Explicit: vLLM's own "auto" turns an fp32 checkpoint into bf16 even where the trainer
        # computes in fp32.
        dtype="bfloat16" if compute_dtype(spec.precision, device) == torch.bfloat16 else "float32",
    )


def sleeps_between_rollouts(spec: RLHFJobSpec) -> bool:
    """Engines sleep while the trainers train when they share GPUs and never generate during training
    (synchronous colocated runs)."""
    return spec.placement == "colocate" and spec.rollout.off_policy_steps == 0


# Imported lazily: vLLM is heavy and absent from images that do not use it.
BACKENDS: dict[EngineName, BackendFactory] = {"hf": _hf, "vllm": _vllm}


def make_backend(spec: RLHFJobSpec, model_path: str | Path, device: torch.device) -> GenerationBackend:
    """The rollout engine named by spec.rollout.engine (`auto` resolved, see kuberlhf.engine_choice)."""
    return BACKENDS[resolved_engine(spec)](spec, model_path, device)
