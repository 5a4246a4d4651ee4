"""How much GPU memory each role needs, and how much host memory a trainer rank needs on CPU: pure
estimates from the spec and the model's shape.

Training is bf16 with fp32 master weights on GPU (fp32 throughout on CPU; the same 16 bytes per
parameter): weights 2, gradients 2, and 12 of optimizer state (fp32 master copy and Adam's two
moments). ZeRO shards the optimizer state (stage 1), the gradients too (2), and the weights too
(3) over the world; offload moves the optimizer state to host memory. Activations follow
Korthikanti et al. (2022) for a transformer layer, 34 bytes per token and hidden unit without
attention scores (flash / SDPA attention keeps none), one layer's worth plus a checkpoint per
layer with gradient checkpointing, plus the fp32 logits the log-probs are computed from. A
ZeRO-3 rank also holds what it gathered, up to DeepSpeed's max-live parameters. A CPU rank is not
this picture moved to host memory (see host_trainer_estimate).
"""

from __future__ import annotations

from dataclasses import dataclass

from kuberlhf.api import ALGORITHMS, RLHFJobSpec, TrainerSpec
from kuberlhf.engine_choice import EngineFacts, choose_engine
from kuberlhf.modelsize import ModelShape

GIB = 2**30
WEIGHT_BYTES, GRAD_BYTES, OPTIMIZER_BYTES = 2, 2, 12
LAYER_ACTIVATION_BYTES = 34  # per token per hidden unit, one transformer layer (bf16)
LOGIT_BYTES = 10  # per token per vocabulary entry: bf16 logits, their fp32 copy, its gradient
# DeepSpeed's default cap on gathered ZeRO-3 parameters per rank, which training.layout keeps. A
# training rank keeps what it gathered in the forward for the backward (the reuse distance is as
# large), so below the cap (every model under 1B) it holds the whole module gathered on its shard.
STAGE3_MAX_LIVE_PARAMETERS = 1e9
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
    """Tokens per row: an offline record is cut to data.maxLength; a rollout is prompt plus response."""
    if ALGORITHMS[spec.algorithm].program == "offline":
        return spec.data.max_length
    return spec.data.max_prompt_tokens + spec.data.max_new_tokens


def logit_tokens(spec: RLHFJobSpec) -> int:
    """Tokens per row whose logits are kept: the response of a rollout, the whole of an offline record."""
    if ALGORITHMS[spec.algorithm].program == "offline":
        return spec.data.max_length
    return spec.data.max_new_tokens


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
    if stage >= 3:
        parts["gathered weights"] = WEIGHT_BYTES * min(p, STAGE3_MAX_LIVE_PARAMETERS)
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
    head = LOGIT_BYTES * micro * logit_tokens(spec) * (shape.vocab or 0) if logits else 0.0
    return float(body + head)


def reference_estimate(spec: RLHFJobSpec, shape: ModelShape, sharded_over: int = 1) -> Estimate:
    """A frozen model's forward: bf16 weights (1/N of them sharded over N ZeRO-3 ranks, plus the
    layer being gathered), one micro-batch of forward activations and logits."""
    micro = spec.actor.micro_batch_size
    inference = 0.0
    if shape.hidden is not None:
        tokens = micro * sequence_length(spec)
        inference = 4 * tokens * shape.hidden + 6 * micro * logit_tokens(spec) * (shape.vocab or 0)
    parts = {"weights": WEIGHT_BYTES * shape.parameters / sharded_over}
    if sharded_over > 1:  # the layer in use, gathered; DeepSpeed never keeps more than max-live
        layer = shape.parameters / shape.layers if shape.layers else shape.parameters
        parts["gathered layer"] = WEIGHT_BYTES * min(layer, STAGE3_MAX_LIVE_PARAMETERS)
    return Estimate(parts | {"activations": inference, "overhead": CUDA_OVERHEAD_GIB * GIB})


def rollout_estimate(spec: RLHFJobSpec, shape: ModelShape, gpu_bytes: float | None) -> Estimate:
    """A vLLM worker takes `gpuMemoryUtilization` of its GPU (weights and KV cache included);
    transformers' generate holds its weights and its batch's KV cache (counted as 20 % more).
    `auto` is planned as the worker image runs it: vLLM installed (images/README.md)."""
    planned = choose_engine(spec, EngineFacts(vllm_installed=True, on_gpu=gpu_bytes is not None,
                                              parameters=shape.parameters, head_size=None))
    if planned.engine == "vllm" and gpu_bytes is not None:
        return Estimate({"vllm budget": spec.rollout.gpu_memory_utilization * gpu_bytes})
    return Estimate(
        {"weights": 1.2 * rollout_weights_bytes(spec, shape), "overhead": CUDA_OVERHEAD_GIB * GIB}
    )


def rollout_weights_bytes(spec: RLHFJobSpec, shape: ModelShape) -> float:
    """Weights one rollout worker holds: bf16, sharded over the tensor-parallel group."""
    return WEIGHT_BYTES * shape.parameters / spec.rollout.tensor_parallel_size


# -- a trainer rank's host memory on CPU (kuberlhf run) ------------------------------------------
# What DeepSpeed allocates on a CPU rank, which is not the GPU picture moved to host memory: the
# module computes in fp32 (precision auto on CPU; bf16 only when asked); ZeRO-1/2 keep the whole
# module in one flat buffer and copy this rank's partition into an fp32 master; every stage's step
# flattens the partition's gradients into a new fp32 tensor, and torch's AdamW on that flat
# partition makes two more of its size; ZeRO-3 holds the whole module gathered while it computes
# (under stage3_max_live_parameters) and keeps, in the allocator, about one module's worth of what
# building it sharded freed (zero.Init's per-parameter shards and the load's gathered copies).
# Checked against each rank's peak resident memory by bench/zero_memory.py (bench/README.md).
FP32_BYTES = 4
ADAM_STATE_BYTES = 8  # exp_avg and exp_avg_sq
STEP_TEMPORARY_BYTES = 12  # the flattened gradient, AdamW's sqrt(exp_avg_sq) and its quotient
HOST_PROCESS_GIB = 0.45  # a rank before its model (measured 0.41-0.43): torch, DeepSpeed, gloo, Ray


def host_trainer_estimate(
    spec: RLHFJobSpec, trainer: TrainerSpec, shape: ModelShape, *, logits: bool = True
) -> Estimate:
    """Peak resident memory of one DeepSpeed rank of `trainer` on a CPU host. Sharded parts shrink
    with the world; the module (stage 0-2) and the gathered module (stage 3) do not, so on CPU,
    where every rank shares one host, ZeRO-3 saves nothing a rank holds while it computes."""
    p, world, stage = shape.parameters, trainer.world_size, trainer.zero_stage
    module = 2 if spec.precision == "bf16" else FP32_BYTES  # bytes per parameter the module computes in
    shard = world if stage >= 1 else 1
    parts = {
        "process": HOST_PROCESS_GIB * GIB,
        "weights": module * p / (world if stage >= 3 else 1),
        # Stage 0 in fp32 steps the module itself; otherwise an fp32 master copy of the partition.
        "master weights": 0.0 if stage == 0 and module == FP32_BYTES else FP32_BYTES * p / shard,
        "gradients": module * p / (world if stage >= 2 else 1),
        "optimizer": ADAM_STATE_BYTES * p / shard,
        "optimizer step": STEP_TEMPORARY_BYTES * p / shard,
    }
    if stage >= 3:
        parts["gathered weights"] = module * min(p, STAGE3_MAX_LIVE_PARAMETERS)
        parts["sharded build"] = module * p
    # Activations at the module's precision (Korthikanti's 34 bytes are for 2-byte activations).
    scale = module / WEIGHT_BYTES
    parts["activations"] = scale * activation_bytes(
        spec, shape, trainer.micro_batch_size, trainer.gradient_checkpointing, logits
    )
    return Estimate(parts)


def host_trainers(spec: RLHFJobSpec) -> dict[str, TrainerSpec]:
    """The DeepSpeed worlds a run trains: the actor, and the critic when the algorithm has one."""
    trainers: dict[str, TrainerSpec] = {"actor": spec.actor}
    if ALGORITHMS[spec.algorithm].critic:
        trainers["critic"] = spec.critic or spec.actor
    return trainers


def host_trainers_bytes(spec: RLHFJobSpec, shape: ModelShape) -> dict[str, float]:
    """Host memory of every rank of each trainer together, by role."""
    return {
        role: t.world_size * host_trainer_estimate(spec, t, shape, logits=role == "actor").total
        for role, t in host_trainers(spec).items()
    }


Change = tuple[str, str, object, str]  # role, spec field, its new value, the field as the spec spells it


def _host_changes(spec: RLHFJobSpec) -> list[list[Change]]:
    """What shrinks a CPU run's trainers, each step applied to every trainer it concerns: ZeRO-2 (no
    gathered copy), checkpointing, one row per micro-batch, then fewer ranks, one at a time."""
    trainers = host_trainers(spec)
    steps: list[list[Change]] = [
        [(r, "zero_stage", 2, "zeroStage") for r, t in trainers.items() if t.zero_stage == 3],
        [(r, "gradient_checkpointing", True, "gradientCheckpointing")
         for r, t in trainers.items() if not t.gradient_checkpointing],
        [(r, "micro_batch_size", 1, "microBatchSize") for r, t in trainers.items() if t.micro_batch_size > 1],
    ]
    most = max(t.replicas for t in trainers.values())
    steps += [[(r, "replicas", n, "replicas") for r, t in trainers.items() if t.replicas > n]
              for n in range(most - 1, 0, -1)]
    return [step for step in steps if step]


def _changed(spec: RLHFJobSpec, changes: list[Change]) -> RLHFJobSpec:
    trainers = host_trainers(spec)
    for role, field, value, _ in changes:
        trainers[role] = trainers[role].model_copy(update={field: value})
    return spec.model_copy(update=trainers)


def _host_fix(spec: RLHFJobSpec, shape: ModelShape, available: float) -> str:
    """The first one change that fits (a ZeRO stage, then fewer ranks...), else the first run of
    them together that does, else what is left: a smaller model or a bigger host."""
    steps = _host_changes(spec)
    # Later steps override earlier ones of the same field (fewer and fewer replicas).
    together = [
        list({(c[0], c[1]): c for step in steps[: i + 1] for c in step}.values()) for i in range(len(steps))
    ]
    tried: list[float] = []
    for changes in [*steps, *together]:
        need = sum(host_trainers_bytes(_changed(spec, changes), shape).values())
        tried.append(need)
        if need <= available:
            fields = ", ".join(f"{role}.{name}: {str(value).lower()}" for role, _, value, name in changes)
            return f"set {fields} (about {need / GIB:.1f} GiB; on CPU every rank holds the whole module)"
    least = f" (no change to the trainers brings them under {min(tried) / GIB:.1f} GiB)" if tried else ""
    return f"use a smaller model (spec.model.actor) or a host with more memory{least}"


def host_memory_problem(spec: RLHFJobSpec, shape: ModelShape, available: float, source: str) -> str | None:
    """The warning `kuberlhf run` prints before a CPU run whose trainer ranks would not fit in the
    host's memory (`available` bytes, `source` says whose limit): the role that needs most, the
    estimate, the limit and a change that would fit. None when it fits or the size is unknown."""
    if not shape.known:
        return None
    need = host_trainers_bytes(spec, shape)
    total = sum(need.values())
    if total <= available:
        return None
    role = max(need, key=lambda r: need[r])
    others = "".join(
        f"; with the {r}'s {b / GIB:.1f} GiB, {total / GIB:.1f} GiB" for r, b in need.items() if r != role
    )
    return (
        f"spec.{role}: its {host_trainers(spec)[role].world_size} DeepSpeed ranks need about "
        f"{need[role] / GIB:.1f} GiB of host memory on CPU (estimate for {shape.describe()}{others}), "
        f"more than the {available / GIB:.1f} GiB of {source}; {_host_fix(spec, shape, available)}"
    )
