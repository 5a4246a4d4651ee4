"""The rollout sample contract: what is asked of a rollout engine and what comes back.

Every rollout backend produces a `GenerationResult`; the reward workers, the trainers and the
checkpoint read nothing else of a rollout, so a backend can change without touching them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


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
    # The prompts' records (one per prompt), from which an environment builds each episode.
    records: tuple[dict[str, Any], ...] = ()


@dataclass
class GenerationResult:
    """One row per sample, grouped by prompt: prompt i owns rows i*n .. i*n+n-1.

    `response_logprobs` are the behaviour log-probs of each generated token under the
    rollout engine's weights at sampling time (temperature-scaled logits, as sampled).

    A multi-turn episode's response interleaves the model's turns with the environment's
    observations; `loss_mask` (None for single-turn rollouts: every token is the model's) is 1 on
    the model's tokens and 0 on the observations', whose log-probs are 0 placeholders. The episode
    fields are None unless an environment ran: `episode_rewards` (the sum of step rewards, 0 for a
    failed episode), `turns`, `truncated` (cut by a token limit), `episode_errors` (why an
    episode failed, None where it did not) and `observation_tokens` (how many of the response's
    tokens the environment wrote: a failed episode's mask is all 0, so the mask cannot tell).
    """

    prompts: list[str]
    responses: list[str]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    response_logprobs: list[list[float]]
    finished: list[bool]
    loss_mask: list[list[int]] | None = None
    episode_rewards: list[float] | None = None
    turns: list[int] | None = None
    truncated: list[bool] | None = None
    episode_errors: list[str | None] | None = None
    observation_tokens: list[int] | None = None

    def __len__(self) -> int:
        return len(self.responses)

    def loss_masks(self) -> list[list[int]]:
        """The per-token loss mask of every row (all ones where the rollout had no environment)."""
        if self.loss_mask is not None:
            return self.loss_mask
        return [[1] * len(r) for r in self.response_ids]


def merge_results(results: list[GenerationResult]) -> GenerationResult:
    """Concatenate the results of several rollout replicas, keeping prompt groups intact."""
    if len(results) == 1:
        return results[0]
    merged: dict[str, Any] = {}
    for f in fields(GenerationResult):
        columns = [getattr(r, f.name) for r in results]
        # An optional column is present in all results or in none (all engines run the same spec).
        merged[f.name] = None if columns[0] is None else [x for column in columns for x in column]
    return GenerationResult(**merged)


def summarize(result: GenerationResult) -> dict[str, int]:
    """What the driver learns of a rollout without fetching it: `response_tokens` are the tokens the
    engine sampled (an episode's observations are not: they were encoded, not generated); episode
    counts only with an environment: turns summed and their maximum, observation tokens, failed and
    truncated episodes."""
    observed = sum(result.observation_tokens or [])
    summary = {"rows": len(result), "response_tokens": sum(len(r) for r in result.response_ids) - observed}
    if result.turns is not None:
        summary.update(
            turns=sum(result.turns),
            turns_max=max(result.turns, default=0),
            observation_tokens=observed,
            episodes_failed=sum(e is not None for e in result.episode_errors or []),
            episodes_truncated=sum(result.truncated or []),
        )
    return summary


def episode_metrics(summaries: list[dict[str, int]]) -> dict[str, float]:
    """A step's episode statistics from its engines' summaries ({} for single-turn rollouts)."""
    if not summaries or "turns" not in summaries[0]:
        return {}
    rows = max(1, sum(s["rows"] for s in summaries))
    return {
        "turns_mean": sum(s["turns"] for s in summaries) / rows,
        "turns_max": float(max(s["turns_max"] for s in summaries)),
        "observation_tokens_mean": sum(s["observation_tokens"] for s in summaries) / rows,
        "episodes_failed": float(sum(s["episodes_failed"] for s in summaries)),
        "episodes_truncated": float(sum(s["episodes_truncated"] for s in summaries)),
    }


def shard(rows: int, rank: int, world: int) -> slice:
    """The contiguous rows worker `rank` of `world` handles (sizes differ by at most one)."""
    return slice(rows * rank // world, rows * (rank + 1) // world)
