"""The model cache: the volume the Ray pods download hub models into (their HF_HOME).

Without one, a pod downloads its models into its container's writable layer: node disk nobody
requested, so a 70B model fills the node and the kubelet evicts the pod, and every pod of every
retry downloads it again. `modelCache.volume: shared` (the default) is one ReadWriteMany PVC owned
by the RLHFJob like the checkpoint volume, whose storage class must offer ReadWriteMany already:
each file is fetched once, by whichever pod gets to it first (huggingface_hub locks every file it
writes into a cache), and stays across retries and suspends. `perPod` gives each pod a generic
ephemeral volume instead, for storage without ReadWriteMany: requested and sized, but every pod
fetches its own copy at every start.

Only pods that load a model from the hub get the cache: builtin models are built where they are
used, and paths are in the image or on a volume. The head only reads tokenizer files (the driver
needs the tokenizer before any actor starts): it shares the claim, but with per-pod volumes its
scratch space holds those few megabytes. Sizes come from the models' parameter counts
(kuberlhf.modelsize from names and model.size: the operator has no model files).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from kuberlhf.api import RLHFJob, RLHFJobSpec
from kuberlhf.jobrefs import PREFIX as JOB_PREFIX
from kuberlhf.modelsize import model_shape
from kuberlhf.placement import Role, host_group, plan_for
from kuberlhf.topology import is_online
from kuberlhf_operator.names import child_names, model_cache_claim, object_meta

CACHE_DIR = "/var/cache/huggingface"
VOLUME_NAME = "model-cache"
HEAD = "head"
# Hub checkpoints of large models are stored in bf16. The margin covers repos that ship a second
# format beside safetensors (the hub client fetches every weight file it is not told to skip), fp32
# checkpoints of small models, and huggingface_hub's own bookkeeping.
BYTES_PER_PARAMETER = 2
MARGIN = 1.5
# Tokenizer and config files are megabytes; a volume is sized in whole GiB.
TOKENIZER_GIB = 1
# A hub model whose name states no size (and no model.size): about a 13B model's bf16 weights.
# A guess, said in the docs; spec.modelCache.size sets the real size.
UNKNOWN_MODEL_GIB = 40

ModelField = tuple[str, str]  # (the spec field, the model reference)


def downloads_from_hub(ref: str) -> bool:
    """Whether a model reference may be fetched from the hub: neither a builtin (built locally), a
    `job:` reference (a folder on the checkpoint volume) nor a path or URL, the same order
    `resolve_model` tries them in. A bare relative name may still be a folder in the image; it
    counts as the hub's, so it gets the token and the cache it might need."""
    local = ref.startswith(("builtin:", JOB_PREFIX, "/", "./", "../", "~")) or "://" in ref
    return not local


def role_models(spec: RLHFJobSpec, role: Role) -> list[ModelField]:
    """The models whose weights a role's ranks load (dpo's frozen reference sits in its trainer ranks)."""
    model = spec.model
    actor = [("spec.model.actor", model.actor)]
    if role == "actor":
        frozen = model.reference if not is_online(spec) else None
        return actor + ([("spec.model.reference", frozen)] if frozen is not None else [])
    if role == "critic":
        return [("spec.model.critic", model.critic)] if model.critic is not None else actor
    if role == "reference":
        return [("spec.model.reference", model.reference)] if model.reference is not None else actor
    if role == "rollout":
        return actor
    reward = spec.reward.model if spec.reward is not None else None
    return [("spec.reward.model", reward)] if reward is not None else []


@dataclass(frozen=True)
class PodModels:
    """The hub models one pod group loads: weights, and references read for their tokenizer only."""

    weights: tuple[ModelField, ...]
    tokenizers: tuple[str, ...]

    def __bool__(self) -> bool:
        return bool(self.weights or self.tokenizers)


def _hub(models: list[ModelField]) -> tuple[ModelField, ...]:
    seen: dict[str, str] = {}
    for field, ref in models:
        if downloads_from_hub(ref):
            seen.setdefault(ref, field)
    return tuple((field, ref) for ref, field in seen.items())


def pod_models(spec: RLHFJobSpec, group: str) -> PodModels:
    """What the pods of `group` (a worker group's role, or "head") fetch from the hub. The roles on a
    group are the plan's (colocated rollout engines and references run on the actor pods); every
    trainer and the driver also read the tokenizer."""
    tokenizer = spec.model.tokenizer or spec.model.actor
    if group == HEAD:
        # The driver checks the actor exists (its config) and reads the tokenizer, nothing more.
        refs = {ref: None for ref in (spec.model.actor, tokenizer) if downloads_from_hub(ref)}
        return PodModels((), tuple(refs))
    roles = {r.role for r in plan_for(spec).ranks if host_group(spec, r.role) == group}
    weights = _hub([m for role in sorted(roles) for m in role_models(spec, role)])
    trains = bool(roles & {"actor", "critic"})
    extra = trains and downloads_from_hub(tokenizer) and tokenizer not in {ref for _, ref in weights}
    return PodModels(weights, (tokenizer,) if extra else ())


def model_groups(spec: RLHFJobSpec) -> list[str]:
    """The worker groups that run ranks of the plan (a reward function's light actors run nowhere
    in particular and load no model)."""
    return sorted({group for r in plan_for(spec).ranks if (group := host_group(spec, r.role)) is not None})


def _all_models(spec: RLHFJobSpec) -> PodModels:
    parts = [pod_models(spec, g) for g in [HEAD, *model_groups(spec)]]
    weights = _hub([m for p in parts for m in p.weights])
    loaded = {ref for _, ref in weights}
    tokenizers = {ref: None for p in parts for ref in p.tokenizers if ref not in loaded}
    return PodModels(weights, tuple(tokenizers))


def _parameters(spec: RLHFJobSpec, field: str, ref: str) -> float | None:
    """A model's parameter count from its name; model.size speaks for the actor only."""
    shape = model_shape(ref, spec.model.size if field == "spec.model.actor" else None, read_files=False)
    return shape.parameters if shape.known else None


def estimated_size(spec: RLHFJobSpec, models: PodModels) -> str:
    """The cache a set of models needs: their bf16 weights with a margin, plus the tokenizers, in Gi."""
    known = [p for field, ref in models.weights if (p := _parameters(spec, field, ref)) is not None]
    unknown = len(models.weights) - len(known)
    gib = (math.ceil(sum(known) * BYTES_PER_PARAMETER * MARGIN / 2**30) + UNKNOWN_MODEL_GIB * unknown
           + TOKENIZER_GIB * len(models.tokenizers))
    return f"{max(gib, TOKENIZER_GIB)}Gi"


def _creates_claim(job: RLHFJob) -> bool:
    cache = job.spec.model_cache
    return cache.volume == "shared" and cache.claim_name is None and bool(_all_models(job.spec))


def model_cache_problems(job: RLHFJob) -> list[str]:
    """What keeps the cache from being built: a contradiction (a size nobody states is guessed)."""
    cache = job.spec.model_cache
    if cache.volume == "perPod" and cache.claim_name is not None:
        return ["spec.modelCache.claimName: perPod volumes are new for each pod; remove claimName or set "
                "modelCache.volume: shared"]
    return []


def build_model_cache_pvc(job: RLHFJob, namespace: str) -> dict[str, Any] | None:
    """The shared cache claim, when the job fetches hub models and names no claim of its own."""
    if not _creates_claim(job):
        return None
    cache = job.spec.model_cache
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": cache.size or estimated_size(job.spec, _all_models(job.spec))}},
    }
    # A cluster's default class is often ReadWriteOnce only: the checkpoint volume's is known to share.
    storage_class = cache.storage_class_name or job.spec.checkpoint.volume.storage_class_name
    if storage_class is not None:
        spec["storageClassName"] = storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": object_meta(job, namespace, child_names(job).model_cache),
        "spec": spec,
    }


def has_cache(job: RLHFJob, group: str) -> bool:
    """Whether a pod of `group` mounts the cache: it fetches from the hub, and it is not the head
    with per-pod volumes (tokenizer files fit its scratch space)."""
    if job.spec.model_cache.volume == "perPod" and group == HEAD:
        return False
    return bool(pod_models(job.spec, group))


def cache_volume(job: RLHFJob, group: str) -> dict[str, Any]:
    cache = job.spec.model_cache
    if cache.volume == "shared":
        return {"name": VOLUME_NAME, "persistentVolumeClaim": {"claimName": model_cache_claim(job)}}
    size = cache.size or estimated_size(job.spec, pod_models(job.spec, group))
    claim: dict[str, Any] = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}}
    if cache.storage_class_name is not None:
        claim["storageClassName"] = cache.storage_class_name
    return {"name": VOLUME_NAME, "ephemeral": {"volumeClaimTemplate": {"spec": claim}}}


def cache_env() -> list[dict[str, Any]]:
    """HF_HOME puts the hub cache and the xet client's cache on the volume; HF_HUB_CACHE too, because
    an image may set it, and it would win over HF_HOME."""
    return [{"name": "HF_HOME", "value": CACHE_DIR}, {"name": "HF_HUB_CACHE", "value": f"{CACHE_DIR}/hub"}]
