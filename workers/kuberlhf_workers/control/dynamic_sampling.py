"""DAPO's dynamic sampling (rollout.dynamicSampling): a step trains only prompt groups whose
rewards vary, generating further rounds of prompts until it has promptsPerStep of them.

Under a group baseline a group whose samples all scored the same has zero advantage: it adds
nothing to the policy gradient but still dilutes the batch. The driver scores each round as
it comes, keeps the groups with variance in draw order, and hands the trainers one batch of
exactly promptsPerStep groups (the DeepSpeed batch size is fixed). A step still short after
maxRounds fills the batch with the first dropped groups, in draw order, and says how many in
`dynamic_groups_filled` rather than failing the run.

Groups are judged on the reward's own score (an environment's episode reward), before
reward.overlong shaping: DAPO filters on the task's outcome, not on length penalties.

Every drawn prompt is consumed, kept or not, and round r of step s samples with its own seeds,
so the sampler position after a step depends only on the scores: a stop and resume continues
exactly where an unbroken run would.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from kuberlhf.api import RLHFJobSpec
from kuberlhf_workers.base.samples import GenerationResult, merge_results, summarize
from kuberlhf_workers.control.rollout_queue import PendingRollout


@dataclass(frozen=True)
class Selection:
    """Which of the drawn groups (indices in draw order) a step trains, and how many it dropped."""

    groups: list[int]
    dropped: int  # zero-variance groups drawn
    filled: int  # of those, trained anyway because maxRounds ran out


def has_variance(rewards: Sequence[float], samples_per_prompt: int) -> list[bool]:
    """Per prompt group (rows i*n .. i*n+n-1): do its samples' rewards differ at all?"""
    if len(rewards) % samples_per_prompt:
        raise ValueError(f"{len(rewards)} rewards do not split into groups of {samples_per_prompt}")
    groups = [rewards[i : i + samples_per_prompt] for i in range(0, len(rewards), samples_per_prompt)]
    return [max(g) != min(g) for g in groups]


def select_groups(varied: Sequence[bool], wanted: int, final: bool) -> Selection | None:
    """The first `wanted` groups with variance, in draw order; None while they are too few and more
    rounds may come. In the final round the shortfall is made up with the first dropped groups."""
    kept = [i for i, v in enumerate(varied) if v]
    dropped = [i for i, v in enumerate(varied) if not v]
    if len(kept) >= wanted:
        return Selection(kept[:wanted], len(dropped), 0)
    if not final:
        return None
    fill = dropped[: wanted - len(kept)]
    return Selection(sorted(kept + fill), len(dropped), len(fill))


def take_groups(result: GenerationResult, groups: Sequence[int], samples_per_prompt: int) -> GenerationResult:
    """The rows of `groups` (in that order), every column kept aligned."""
    rows = [g * samples_per_prompt + j for g in groups for j in range(samples_per_prompt)]
    picked: dict[str, Any] = {}
    for f in fields(GenerationResult):
        column = getattr(result, f.name)
        picked[f.name] = None if column is None else [column[r] for r in rows]
    return GenerationResult(**picked)


@dataclass
class Round:
    """One generation round, fetched: its prompts' records, results, per-row rewards and the
    sampler position from before its prompts."""

    records: list[dict[str, Any]]
    result: GenerationResult
    rewards: list[float]
    sampler_before: dict[str, int]


@dataclass
class DynamicBatch:
    """A step's training batch and what dynamic sampling did to make it."""

    sampler_before: dict[str, int]
    records: list[dict[str, Any]]
    result: GenerationResult
    rewards: list[float]
    metrics: dict[str, float]


def fill_batch(
    generate: Callable[[int], Round], wanted: int, samples_per_prompt: int, max_rounds: int
) -> DynamicBatch:
    """Generate rounds (`generate(r)` draws, samples and scores round r) until `wanted` groups vary."""
    drawn: list[Round] = []
    extra_s = 0.0
    selection: Selection | None = None
    while selection is None:
        started = time.perf_counter()
        drawn.append(generate(len(drawn)))
        if len(drawn) > 1:
            extra_s += time.perf_counter() - started
        rewards = [x for r in drawn for x in r.rewards]
        selection = select_groups(has_variance(rewards, samples_per_prompt), wanted, len(drawn) == max_rounds)
    records = [rec for r in drawn for rec in r.records]
    result = take_groups(merge_results([r.result for r in drawn]), selection.groups, samples_per_prompt)
    rows = [g * samples_per_prompt + j for g in selection.groups for j in range(samples_per_prompt)]
    return DynamicBatch(
        drawn[0].sampler_before,
        [records[g] for g in selection.groups],
        result,
        [rewards[r] for r in rows],
        {
            "dynamic_rounds": float(len(drawn)),
            "dynamic_groups_dropped": float(selection.dropped),
            "dynamic_groups_filled": float(selection.filled),
            "time_dynamic_extra_s": extra_s,
        },
    )


def dynamic_rollout(
    spec: RLHFJobSpec,
    step: int,
    rollout: Callable[[int, int], tuple[PendingRollout, list[dict[str, int]]]],
    score: Callable[[int, list[dict[str, Any]], list[Any]], list[Any]],
    weights_step: int,
) -> tuple[PendingRollout, list[dict[str, int]], list[Any], dict[str, float]]:
    """The driver's step rollout under dynamic sampling: `rollout(step, round)` generates a round
    (replacing dead engines), `score` is the driver's reward call. Returns the batch as one
    rollout in the object store, its summary, its reward refs (none with an environment, whose
    episodes carry their rewards) and the dynamic_* metrics. The driver fetches each round: the
    selection needs the rewards, and the kept rows become a new object."""
    import ray

    def sampled(round_: int) -> Round:
        pending, _ = rollout(step, round_)
        results = merge_results(ray.get(pending.refs))
        if spec.environment is not None:
            rewards = list(results.episode_rewards or [])
        else:
            rewards = [x for part in ray.get(score(step, pending.records, pending.refs)) for x in part]
        return Round(pending.records, results, rewards, pending.sampler_before)

    r = spec.rollout
    batch = fill_batch(sampled, r.prompts_per_step, r.samples_per_prompt, r.dynamic_sampling.max_rounds)
    refs = [ray.put(batch.result)]
    pending = PendingRollout(step, batch.records, refs, [], batch.sampler_before, weights_step)
    rewards = [] if spec.environment is not None else [ray.put(batch.rewards)]
    return pending, [summarize(batch.result)], rewards, batch.metrics
