"""Batch arithmetic and the DeepSpeed config that follows from it (pure)."""

from __future__ import annotations

import pytest

from kuberlhf.api import TrainerSpec
from kuberlhf_workers.training.layout import deepspeed_config, train_layout

pytestmark = pytest.mark.unit


def test_a_batch_that_the_ranks_cannot_split_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"spec\.actor\.replicas: 3 ranks"):
        train_layout(32, TrainerSpec(replicas=3), "actor")


def test_micro_batches_and_accumulation_multiply_back_to_the_global_batch() -> None:
    layout = train_layout(64, TrainerSpec(replicas=2, micro_batch_size=4, global_batch_size=32), "actor")
    assert (layout.world, layout.micro, layout.accumulation, layout.global_batch) == (2, 4, 4, 32)


@pytest.mark.parametrize("stage", [2, 3])
def test_communication_buckets_are_sized_by_the_model_not_deepspeeds_gpu_defaults(stage: int) -> None:
    trainer = TrainerSpec(zero_stage=stage)
    layout = train_layout(8, trainer, "actor")
    zero = deepspeed_config(trainer, layout, on_gpu=False, hidden_size=1024)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 1024 * 1024 < 5e8
    if stage == 3:
        assert zero["stage3_prefetch_bucket_size"] < zero["reduce_bucket_size"]
        assert zero["stage3_param_persistence_threshold"] == 10 * 1024
    else:
        assert zero["allgather_bucket_size"] == 1024 * 1024
    assert "reduce_bucket_size" not in deepspeed_config(trainer, layout, on_gpu=False)["zero_optimization"]
