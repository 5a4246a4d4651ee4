"""The reward Ray actor: scores a step's rollout with the spec's reward source, loaded once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kuberlhf.api import RLHFJobSpec
from kuberlhf_workers.base.models import pick_device
from kuberlhf_workers.base.samples import merge_results, shard
from kuberlhf_workers.rewards.sources import make_reward_fn, score


class RewardWorker:
    """Scores its share of each step's completions with the spec's reward (loaded once per actor:
    a reward model on this actor's GPU when it has one)."""

    def __init__(self, spec: RLHFJobSpec, spec_dir: str, gpus: float = 0.0):
        token = os.environ.get("KUBERLHF_REWARD_TOKEN")
        device = str(pick_device(gpus))
        self.fn = make_reward_fn(spec.online_reward(), Path(spec_dir), token, device, spec.precision)
        self.rows_scored = 0

    def ready(self) -> bool:
        return True

    def score(
        self,
        rollout_refs: list[Any],
        records: list[dict[str, Any]],
        samples_per_prompt: int,
        rank: int = 0,
        world: int = 1,
    ) -> list[float]:
        """Scores of rows `shard(rows, rank, world)` of the step (every replica takes a share)."""
        import ray

        result = merge_results(ray.get(rollout_refs))
        mine = shard(len(result), rank, world)
        per_sample = [r for r in records for _ in range(samples_per_prompt)][mine]
        keys = sorted({k for r in records for k in r if k != "prompt"})
        extra = {k: [r.get(k) for r in per_sample] for k in keys}
        self.rows_scored += mine.stop - mine.start
        return score(self.fn, result.prompts[mine], result.responses[mine], extra)

    def scored(self) -> int:
        """Rows this replica has scored so far (how the load spreads over replicas)."""
        return self.rows_scored
