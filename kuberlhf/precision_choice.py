"""`precision: auto` made concrete for a run on CPUs only: bf16 or fp32, from the CPU and the model.

Each worker still resolves whatever the spec says on its own node (kuberlhf_workers.base.precision:
auto is bf16 on a GPU with bf16, fp32 on a CPU), because a node alone does not know the model's
size. A run whose every role is on CPUs (`kuberlhf run` locally, a CPU-only RayJob) is decided
here, once, before any worker starts, so trainers and engines agree:
- bf16 when this CPU multiplies bf16 natively (AVX-512 BF16, AMX, Arm BF16) and the actor's hidden
  size is at least `CPU_BF16_MIN_HIDDEN`: measured there, a train step under bf16 autocast is
  faster than fp32's and rollouts too (bench/cpu_precision.py, bench/README.md "bf16 on CPU");
- fp32 otherwise: for toy models (builtin:tiny, hidden 64) bf16's casts cost more than its
  matmuls save, and on a CPU without bf16 instructions it is emulated.
A run with GPUs keeps `auto` for its workers to decide (bf16 on every bf16 GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

from kuberlhf.api import RLHFJobSpec
from kuberlhf.modelsize import model_config

# The smallest actor hidden size at which bf16 beats fp32 on a CPU with bf16 instructions.
CPU_BF16_MIN_HIDDEN = 256
AS_SET = "as set in spec.precision"


@dataclass(frozen=True)
class PrecisionFacts:
    """What the choice depends on beyond the spec. hidden: None when the config is not readable."""

    cpu_bf16: bool
    hidden: int | None


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str
    reason: str

    def describe(self, requested: str) -> str:
        """The one log line a run prints about it."""
        return f"precision: {requested} -> {self.precision} ({self.reason})"


def uses_gpus(spec: RLHFJobSpec) -> bool:
    """Whether any role of the job asks for GPUs (then its workers resolve auto on their nodes)."""
    roles = [spec.rollout, spec.actor, spec.critic, spec.reference, spec.reward]
    return any(role is not None and role.resources.gpus > 0 for role in roles)


def choose_precision(spec: RLHFJobSpec, facts: PrecisionFacts) -> PrecisionChoice:
    """The precision an all-CPU run of `spec` computes in; an explicit bf16 or fp32 is kept."""
    if spec.precision != "auto":
        return PrecisionChoice(spec.precision, AS_SET)
    if not facts.cpu_bf16:
        return PrecisionChoice("fp32", "this CPU has no bf16 matrix instructions")
    if facts.hidden is None:
        return PrecisionChoice("fp32", "CPU run, the actor's config is not readable here")
    if facts.hidden < CPU_BF16_MIN_HIDDEN:
        return PrecisionChoice("fp32", f"CPU run, hidden size {facts.hidden} < {CPU_BF16_MIN_HIDDEN}: "
                               "bf16 is slower for a model this small")
    return PrecisionChoice("bf16", f"CPU with bf16 instructions, hidden size {facts.hidden} >= "
                           f"{CPU_BF16_MIN_HIDDEN}")


def actor_hidden(spec: RLHFJobSpec) -> int | None:
    found = model_config(spec.model.actor)
    hidden = found[0].get("hidden_size") if found is not None else None
    return hidden if isinstance(hidden, int) else None
