"""The reference: a ZeRO-3 reference sharded over its workers scores exactly as a whole one."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from kuberlhf_workers.base.models import ModelRef
from kuberlhf_workers.base.samples import GenerationResult

pytestmark = pytest.mark.timeout(300)


def _rollout(rows: int, seed: int = 0) -> GenerationResult:
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 200) for _ in range(rng.randrange(2, 6))] for _ in range(rows)]
    responses = [[rng.randrange(3, 200) for _ in range(rng.randrange(1, 7))] for _ in range(rows)]
    return GenerationResult(
        prompts=["p"] * rows,
        responses=["r"] * rows,
        prompt_ids=prompts,
        response_ids=responses,
        response_logprobs=[[0.0] * len(r) for r in responses],
        finished=[True] * rows,
    )


def test_a_zero3_reference_sharded_over_two_workers_holds_half_and_scores_as_a_whole_one(
    ray_session: None, tiny_model_dir: Path
) -> None:
    import ray

    from kuberlhf_workers.training.reference import ReferenceWorker

    ref = ModelRef(str(tiny_model_dir), "spec.model.reference")
    rows, micro = 5, 2  # shares of 2 and 3 rows: the short share pads its forwards to the long one's
    rollout = [ray.put(_rollout(rows))]
    whole = ReferenceWorker(ref, 0, 1, 0, 0.7, micro, "fp32")
    expected = whole.logprobs(rollout, 0, 1)
    full_numel = sum(p.numel() for p in whole.model.parameters())

    remote = ray.remote(num_cpus=0)(ReferenceWorker)
    workers = [remote.remote(ref, 0, 1, 0, 0.7, micro, "fp32", 3, i, 2) for i in range(2)]
    master = ray.get(workers[0].master_address.remote())
    ray.get([w.init_world.remote(master, 120.0) for w in workers], timeout=240)
    held = ray.get([w.__ray_call__.remote(lambda self: sum(
        p.ds_tensor.numel() for p in self.model.parameters())) for w in workers])
    assert all(h <= full_numel / 2 + 1024 for h in held), (held, full_numel)  # ~half each, never all
    parts = ray.get([w.logprobs.remote(rollout, i, 2) for i, w in enumerate(workers)], timeout=120)
    assert [len(p) for p in parts] == [2, 3]
    got = torch.cat(parts)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
