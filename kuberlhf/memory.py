"""How much GPU memory each role needs: a pure estimate from the spec and the model's shape.

Training is bf16 with fp32 master weights on GPU (fp32 throughout on CPU; the same 16 bytes per
parameter): weights 2, gradients 2, and 12 of optimizer state (fp32 master copy and Adam's two
moments). ZeRO shards the optimizer state (stage 1), the gradients too (2), and the weights too
(3) over the world; offload moves the optimizer state to host memory. Activations follow
Korthikanti et al. (2022) for a transformer layer, 34 bytes per token and hidden unit without
attention scores (flash / SDPA attention keeps none), one layer's worth plus a checkpoint per
layer with gradient checkpointing, plus the fp32 logits the log-probs are computed from.
"""

from __future__ import annotations

from dataclasses import dataclass

from kuberlhf.api import RLHFJobSpec, TrainerSpec
from kuberlhf.modelsize import ModelShape

GIB = 2**30
WEIGHT_BYTES, GRAD_BYTES, OPTIMIZER_BYTES = 2, 2, 12
LAYER_ACTIVATION_BYTES = 34  # per token per hidden unit, one transformer layer (bf16)
LOGIT_BYTES = 10  # per token per vocabulary entry: bf16 logits, their fp32 copy, its gradient
STAGE3_MAX_LIVE_PARAMETERS = 1e9  # DeepSpeed's default cap on gathered ZeRO-3 parameters per rank
CUDA_OVERHEAD_GIB = 1.5  # CUDA context, NCCL buffers, allocator fragmentation (per process)


@dataclass(frozen=True)
class Estimate:
    """Bytes one process needs on its GPU, by part."""

    parts: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def gib(self) -> float:
        return self.total / GIB


def sequence_length(spec: RLHFJobSpec) -> int:
    return spec.data.max_prompt_tokens + spec.data.max_new_tokens


def trainer_estimate(
    spec: RLHFJobSpec, trainer: TrainerSpec, shape: ModelShape, *, logits: bool = True
) -> Estimate:
    """One DeepSpeed rank of `trainer` (the actor with logits, the critic with a value head)."""
    p, world, stage = shape.parameters, trainer.world_size, trainer.zero_stage
    optimizer = 0.0 if trainer.offload_optimizer and stage >= 1 else OPTIMIZER_BYTES * p
    parts = {
        "weights": WEIGHT_BYTES * p / (world if stage >= 3 else 1),
        "gradients": GRAD_BYTES * p / (world if stage >= 2 else 1),
        "optimizer": optimizer / (world if stage >= 1 else 1),
    }
    parts["activations"] = activation_bytes(
        spec, shape, trainer.micro_batch_size, trainer.gradient_checkpointing, logits
    )
    parts["overhead"] = CUDA_OVERHEAD_GIB * GIB
    return Estimate(parts)


def activation_bytes(
    spec: RLHFJobSpec, shape: ModelShape, micro: int, checkpointing: bool, logits: bool
) -> float:
    """Activations of one micro-batch's forward and backward (0 when the shape is unknown)."""
    if shape.hidden is None or shape.layers is None:
        return 0.0
    tokens = micro * sequence_length(spec)
    per_layer = LAYER_ACTIVATION_BYTES * tokens * shape.hidden
    body = (
        (per_layer + 2 * tokens * shape.hidden * shape.layers) if checkpointing else per_layer * shape.layers
    )
    head = LOGIT_BYTES * micro * spec.data.max_new_tokens * (shape.vocab or 0) if logits else 0.0
    return float(body + head)


def reference_estimate(spec: RLHFJobSpec, shape: ModelShape, sharded_over: int = 1) -> Estimate:
    """A frozen model's forward: bf16 weights (1/N of them sharded over N ZeRO-3 ranks, plus the
    layer being gathered), one micro-batch of forward activations and logits."""
    micro = spec.actor.micro_batch_size
    inference = 0.0
    if shape.hidden is not None:
        tokens = micro * sequence_length(spec)
        inference = 4 * tokens * shape.hidden + 6 * micro * spec.data.max_new_tokens * (shape.vocab or 0)
    parts = {"weights": WEIGHT_BYTES * shape.parameters / sharded_over}
    if sharded_over > 1:  # the layer in use, gathered; DeepSpeed never keeps more than max-live
        layer = shape.parameters / shape.layers if shape.layers else shape.parameters
        parts["gathered layer"] = WEIGHT_BYTES * min(layer, STAGE3_MAX_LIVE_PARAMETERS)
    return Estimate(parts | {"activations": inference, "overhead": CUDA_OVERHEAD_GIB * GIB})


def rollout_estimate(spec: RLHFJobSpec, shape: ModelShape, gpu_bytes: float | None) -> Estimate:
    """A vLLM worker takes `gpuMemoryUtilization` of its GPU (weights and KV cache included);
    transformers' generate holds its weights and its batch's KV cache (counted as 20 % more)."""
    if spec.rollout.engine == "vllm" and gpu_bytes is not None:
        return Estimate({"vllm budget": spec.rollout.gpu_memory_utilization * gpu_bytes})
    return Estimate(
        {"weights": 1.2 * rollout_weights_bytes(spec, shape), "overhead": CUDA_OVERHEAD_GIB * GIB}
    )


def rollout_weights_bytes(spec: RLHFJobSpec, shape: ModelShape) -> float:
    """Weights one rollout worker holds: bf16, sharded over the tensor-parallel group."""
    return WEIGHT_BYTES * shape.parameters / spec.rollout.tensor_parallel_size
