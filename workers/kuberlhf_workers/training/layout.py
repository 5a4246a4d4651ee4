"""How a rollout batch maps onto a DeepSpeed world, and the DeepSpeed config that follows from it.

Pure: checked at startup, before any actor exists, so bad batch arithmetic fails naming the
field instead of hanging a rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kuberlhf.api import TrainerSpec


@dataclass(frozen=True)
class Layout:
    """How one rollout batch splits into ranks, optimizer steps and micro-batches."""

    rows: int
    world: int
    micro: int
    accumulation: int

    @property
    def global_batch(self) -> int:
        return self.micro * self.accumulation * self.world


def train_layout(rows: int, trainer: TrainerSpec, field: str) -> Layout:
    """Check the batch arithmetic up front, with the fix in the message, instead of hanging a rank."""
    world = trainer.world_size
    if rows % world:
        raise ValueError(
            f"spec.{field}.replicas: {world} ranks (one per GPU) cannot split a rollout batch of {rows} "
            "(promptsPerStep * samplesPerPrompt) evenly; pick a divisor"
        )
    global_batch = trainer.global_batch_size or rows
    if rows % global_batch:
        raise ValueError(f"spec.{field}.globalBatchSize: {global_batch} must divide the rollout batch {rows}")
    micro = min(trainer.micro_batch_size, global_batch // world)
    if (global_batch // world) % micro:
        raise ValueError(
            f"spec.{field}.microBatchSize: {micro} must divide the per-rank batch {global_batch // world}"
        )
    return Layout(rows, world, micro, global_batch // world // micro)


def bucket_sizes(stage: int, hidden_size: int) -> dict[str, int]:
    """Communication buffers sized for the model (the formulas transformers uses for "auto").
    DeepSpeed's defaults (5e8 elements: 2 GB of fp32 per bucket) are sized for GPUs and big models;
    on a small model or a CPU rank they, not the model, set the memory peak."""
    sizes = {"reduce_bucket_size": hidden_size * hidden_size}
    if stage == 3:
        sizes |= {
            "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "stage3_param_persistence_threshold": 10 * hidden_size,
        }
    else:
        sizes["allgather_bucket_size"] = hidden_size * hidden_size
    return sizes


def deepspeed_config(
    trainer: TrainerSpec, layout: Layout, on_gpu: bool, hidden_size: int | None = None, *, bf16: bool = False
) -> dict[str, Any]:
    """`bf16`: DeepSpeed's bf16 mode (a GPU's; on a CPU the rank computes under bf16 autocast over an
    fp32 module instead, training/rank.py): the module computes in bf16 while the optimizer keeps
    fp32 master weights and its state in fp32 (ZeRO's fp32 partitions; at stage 0 its unfused
    wrapper's fp32 copies)."""
    zero: dict[str, Any] = {"stage": trainer.zero_stage}
    if hidden_size is not None:
        zero |= bucket_sizes(trainer.zero_stage, hidden_size)
    if trainer.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    return {
        "train_batch_size": layout.global_batch,
        "train_micro_batch_size_per_gpu": layout.micro,
        "gradient_accumulation_steps": layout.accumulation,
        "gradient_clipping": trainer.max_grad_norm,
        "optimizer": {
            "type": "AdamW",
            # torch's fused AdamW: one kernel over all parameters, 4x faster than the per-tensor
            # loop at 135M on CPU (0.43 -> 0.10 s a step), and the fast path on CUDA too.
            "params": {"lr": trainer.learning_rate, "weight_decay": 0.0, "torch_adam": True, "fused": True},
        },
        "zero_force_ds_cpu_optimizer": False,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def inference_config(micro: int, hidden_size: int | None, *, bf16: bool) -> dict[str, Any]:
    """A ZeRO-3 world that only runs forwards (the sharded reference): parameters partitioned over
    the ranks and gathered one layer at a time, no optimizer, no gradients."""
    zero: dict[str, Any] = {"stage": 3}
    if hidden_size is not None:
        zero |= bucket_sizes(3, hidden_size)
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
