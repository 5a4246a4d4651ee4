"""The reward Ray actor: scores a step's rollout with the spec's reward source, loaded once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kuberlhf.api import RLHFJobSpec
from kuberlhf_workers.base.samples import merge_results
from kuberlhf_workers.rewards.sources import make_reward_fn, score


class RewardWorker:
    """Scores completions with the spec's reward (loaded once per actor)."""

    def __init__(self, spec: RLHFJobSpec, spec_dir: str):
        token = os.environ.get("KUBERLHF_REWARD_TOKEN")
        self.fn = make_reward_fn(spec.reward, Path(spec_dir), token)

    def ready(self) -> bool:
        return True

    def score(
        self, rollout_refs: list[Any], records: list[dict[str, Any]], samples_per_prompt: int
    ) -> list[float]:
        import ray

        result = merge_results(ray.get(rollout_refs))
        per_sample = [r for r in records for _ in range(samples_per_prompt)]
        keys = sorted({k for r in records for k in r if k != "prompt"})
        extra = {k: [r.get(k) for r in per_sample] for k in keys}
        return score(self.fn, result.prompts, result.responses, extra)
