"""The rollout sample contract: what is asked of a rollout engine and what comes back.

Every rollout backend produces a `GenerationResult`; the reward workers, the trainers and the
checkpoint read nothing else of a rollout, so a backend can change without touching them.
"""

from __future__ import annotations

from dataclasses import dataclass


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


def merge_results(results: list[GenerationResult]) -> GenerationResult:
    """Concatenate the results of several rollout replicas, keeping prompt groups intact."""
    if len(results) == 1:
        return results[0]
    return GenerationResult(
        prompts=[p for r in results for p in r.prompts],
        responses=[p for r in results for p in r.responses],
        prompt_ids=[p for r in results for p in r.prompt_ids],
        response_ids=[p for r in results for p in r.response_ids],
        response_logprobs=[p for r in results for p in r.response_logprobs],
        finished=[f for r in results for f in r.finished],
    )


def summarize(result: GenerationResult) -> dict[str, int]:
    """What the driver learns of a rollout without fetching it."""
    return {"rows": len(result), "response_tokens": sum(len(r) for r in result.response_ids)}


def shard(rows: int, rank: int, world: int) -> slice:
    """The contiguous rows worker `rank` of `world` handles (sizes differ by at most one)."""
    return slice(rows * rank // world, rows * (rank + 1) // world)
