"""Two actor ranks form one DeepSpeed world (ZeRO-2 and ZeRO-3): after a real training step both
ranks hold the same weights, and the weight sync hands exactly those weights to the rollout engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from run_specs import job_dict

from kuberlhf.api import parse_job

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]



@pytest.mark.parametrize(
    ("zero_stage", "transport", "bucket_mb"),
    [(2, "object-store", 64), (3, "gloo", 1)],
    ids=["zero2", "zero3"],
)
def test_two_ranks_stay_identical_and_sync_delivers_their_weights(
    ray_session, tiny_model_dir: Path, tmp_path: Path, zero_stage: int, transport: str, bucket_mb: int
):
    import ray

    from kuberlhf_workers.control.driver import Driver

    job = parse_job(
        job_dict(
            tiny_model_dir,
            actor={"replicas": 2, "zeroStage": zero_stage, "learningRate": 1e-2, "microBatchSize": 8},
            weightSync={"transport": transport, "bucketMB": bucket_mb},
        )
    )
    (tmp_path / "digits.py").write_text(
        "def reward(prompts, completions, **kw):\n    return [float(c.count('1')) for c in completions]\n"
    )
    driver = Driver(job, tmp_path, tmp_path / "out")
    driver.setup()
    exported = tmp_path / "exported"
    try:
        before = ray.get(driver.rollouts[0].parameters())
        metrics = driver.train_step(0)
        rank0, rank1 = ray.get([a.parameters() for a in driver.actors])
        masters = ray.get([a.parameters(master=True) for a in driver.actors])[0]
        synced = ray.get(driver.rollouts[0].parameters())
        # Exported a shard file at a time (64 KiB here), as save_pretrained lays them out.
        ray.get([a.export(str(exported), 2**16) for a in driver.actors])
    finally:
        driver.release()
    from transformers import AutoModelForCausalLM

    from kuberlhf_workers.base.precision import compute_dtype

    dtype = compute_dtype(job.spec.precision, torch.device("cpu"))
    assert len(list(exported.glob("model-*-of-*.safetensors"))) > 1
    assert (exported / "model.safetensors.index.json").is_file() and (exported / "tokenizer.json").is_file()
    loaded = dict(AutoModelForCausalLM.from_pretrained(exported).named_parameters())
    assert set(loaded) == set(rank0)
    for name, tensor in rank0.items():
        # The export holds the fp32 master weights; the module computes with their rounding to its
        # dtype (bf16 under the default precision on a bf16 CPU, else the masters themselves).
        assert torch.equal(loaded[name].detach(), masters[name]), f"{name} differs in the exported model"
        assert torch.equal(masters[name].to(dtype).float(), tensor), f"{name}: not its master, rounded"
    assert metrics["time_sync_s"] > 0
    assert [n for n in rank0 if not torch.equal(before[n], rank0[n])], "the step should move the weights"
    assert set(rank0) == set(rank1) == set(synced)
    for name, tensor in rank0.items():
        assert torch.equal(rank1[name], tensor), f"{name} differs between the two ranks"
        assert torch.equal(synced[name], tensor), (
            f"{name} differs in the rollout engine after {transport} sync"
        )
