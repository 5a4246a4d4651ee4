"""The driver's queue of rollouts, as plain data: what one step asks of the rollout engines, and
how a queued rollout is written into a checkpoint and read back.

With rollout.offPolicySteps = d the queue holds up to d rollouts generated ahead of training;
a checkpoint keeps them (they came from weights the checkpoint no longer holds), so a resumed
run trains on the very samples an unbroken run would have.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from kuberlhf.api import RLHFJobSpec
from kuberlhf_workers.base.samples import GenerationRequest, GenerationResult
from kuberlhf_workers.base.seeds import mix_seed


@dataclass
class PendingRollout:
    """A rollout submitted to the engines, with the sampler position from before its prompts and
    how many updates the engines' weights held when it was submitted. `summaries` are
    (engine label, ObjectRef of `summarize(result)`), `refs` the results themselves."""

    step: int
    records: list[dict[str, Any]]
    refs: list[Any]
    summaries: list[tuple[str, Any]]
    sampler_before: dict[str, int]
    weights_step: int


def rollout_seed(seed: int, step: int, engine: int, round_: int = 0) -> int:
    """Sampling seed of one engine at one step (and dynamic-sampling round; round 0 is the step's
    only one otherwise): a resumed run samples exactly as an unbroken one."""
    return mix_seed(seed, step, engine, round_)


def split_prompts(records: list[dict[str, Any]], engines: int) -> list[list[dict[str, Any]]]:
    """Contiguous, near-equal slices of the step's prompts, one per engine (empty ones dropped)."""
    n = len(records)
    parts = [records[n * i // engines : n * (i + 1) // engines] for i in range(engines)]
    return [p for p in parts if p]


def generation_requests(
    spec: RLHFJobSpec, step: int, records: list[dict[str, Any]], engines: int, round_: int = 0
) -> list[GenerationRequest]:
    """One request per engine for this step's prompts (the same ones for a regenerated step)."""
    return [
        GenerationRequest(
            prompts=[r["prompt"] for r in part],
            samples_per_prompt=spec.rollout.samples_per_prompt,
            max_new_tokens=spec.data.max_new_tokens,
            temperature=spec.rollout.temperature,
            top_p=spec.rollout.top_p,
            max_prompt_tokens=spec.data.max_prompt_tokens,
            seed=rollout_seed(spec.seed, step, i, round_),
            records=tuple(part) if spec.environment is not None else (),
        )
        for i, part in enumerate(split_prompts(records, engines))
    ]


def to_saved(pending: PendingRollout, results: list[GenerationResult]) -> dict[str, Any]:
    """A queued rollout and its fetched results as JSON-ready data."""
    return {
        "step": pending.step,
        "records": pending.records,
        "sampler_before": pending.sampler_before,
        "weights_step": pending.weights_step,
        "results": [asdict(r) for r in results],
    }


def saved_results(saved: dict[str, Any]) -> list[GenerationResult]:
    return [GenerationResult(**r) for r in saved["results"]]
