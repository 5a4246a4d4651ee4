"""The one generation interface every rollout backend (hf, vllm) implements.

The driver only ever talks to a `GenerationBackend` (inside a Ray rollout actor), so
swapping transformers' generate for vLLM changes no training code, and weight sync
needs one entry point: `load_weights`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class GenerationRequest:
    """Sample `samples_per_prompt` completions for each prompt (prompts are plain text)."""

    prompts: list[str]
    samples_per_prompt: int
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    max_prompt_tokens: int = 256
    seed: int = 0


@dataclass
class GenerationResult:
    """One row per sample, grouped by prompt: prompt i owns rows i*n .. i*n+n-1.

    `response_logprobs` are the behaviour log-probs of each generated token under the
    rollout engine's weights at sampling time (temperature-scaled logits, as sampled).
    """

    prompts: list[str]
    responses: list[str]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    response_logprobs: list[list[float]]
    finished: list[bool]

    def __len__(self) -> int:
        return len(self.responses)


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
