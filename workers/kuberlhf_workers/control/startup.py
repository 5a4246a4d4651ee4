"""Starting one job's workers: every actor group the topology names, the trainers' DeepSpeed
worlds and the weight-sync group.

Whatever does not depend on something else starts at once: the trainers load their models and
join their worlds while the rollout engines, references and reward workers load theirs, so
startup takes the slowest of them, not the sum.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kuberlhf import topology
from kuberlhf.api import RLHFJob, TrainerRole
from kuberlhf_workers.base.data import PromptSampler, load_prompts
from kuberlhf_workers.base.models import ModelRef, local_model
from kuberlhf_workers.control.faults import wait_all
from kuberlhf_workers.control.groups import ActorGroup, start_group, threads_per_actor
from kuberlhf_workers.control.handles import ReferenceHandle, RewardHandle, RolloutHandle, TrainerHandle
from kuberlhf_workers.control.weight_sync import WeightSync
from kuberlhf_workers.rewards.worker import RewardWorker
from kuberlhf_workers.rollout.worker import RolloutWorker
from kuberlhf_workers.training.layout import train_layout
from kuberlhf_workers.training.reference import ReferenceWorker
from kuberlhf_workers.training.trainer import TrainerWorker

HINT = "raise spec.schedule.stepTimeoutSeconds if loading the models legitimately takes longer"


@dataclass
class Workers:
    """A started job: its actors by role, the prompt stream and the rollout engines' weight sync."""

    sampler: PromptSampler
    rollout_group: ActorGroup[RolloutHandle]
    actors: list[TrainerHandle]
    weight_sync: WeightSync
    critics: list[TrainerHandle] = field(default_factory=list)
    references: list[ReferenceHandle] = field(default_factory=list)
    rewards: list[RewardHandle] = field(default_factory=list)


def start_workers(job: RLHFJob, spec_dir: Path, local: bool, timeout_s: float, groups: list[Any]) -> Workers:
    """Start everything a step needs; placement groups are appended to `groups` (the caller removes
    them). Bad batch arithmetic and unknown models fail here, naming the field, before any actor."""
    from transformers import AutoTokenizer

    spec = job.spec
    rows = spec.rollout.prompts_per_step * spec.rollout.samples_per_prompt
    train_layout(rows, spec.actor, "actor")
    if spec.critic is not None:
        train_layout(rows, spec.critic, "critic")
    # Actors get model references, not paths: each resolves its own copy (in a cluster the
    # driver's folders are not on the workers' pods). Resolving here first fails fast on a typo.
    actor_ref = ModelRef(spec.model.actor, "spec.model.actor")
    tok_ref = ModelRef(spec.model.tokenizer, "spec.model.tokenizer") if spec.model.tokenizer else actor_ref
    critic_ref = ModelRef(spec.model.critic, "spec.model.critic") if spec.model.critic else actor_ref
    ref_ref = ModelRef(spec.model.reference, "spec.model.reference") if spec.model.reference else actor_ref
    tokenizer = AutoTokenizer.from_pretrained(local_model(tok_ref))
    local_model(actor_ref)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampler = PromptSampler(load_prompts(spec.data, spec_dir), spec.seed, spec.data.shuffle)

    threads = threads_per_actor(spec, local)
    requests = topology.actor_requests(spec)
    name = job.metadata.name
    req = requests["rollout"]
    rollout_group = start_group(
        RolloutWorker,
        req,
        f"{name}-rollout",
        lambda i: (spec, actor_ref, req.gpus, threads),
        lambda actor, i: RolloutHandle(actor, f"rollout engine {i}"),
        groups,
    )

    def trainers(role: TrainerRole, model: ModelRef) -> list[TrainerHandle]:
        treq = requests[role]
        return start_group(
            TrainerWorker,
            treq,
            f"{name}-{role}",
            lambda i: (role, spec, model, tok_ref, i, treq.gpus, threads, pad_id),
            lambda actor, i: TrainerHandle(actor, f"{role} rank {i}"),
            groups,
        ).actors

    actors = trainers("actor", actor_ref)
    critics = trainers("critic", critic_ref) if "critic" in requests else []
    references: list[ReferenceHandle] = []
    if "reference" in requests:
        rreq, temperature = requests["reference"], spec.rollout.temperature
        references = start_group(
            ReferenceWorker,
            rreq,
            f"{name}-reference",
            lambda i: (ref_ref, rreq.gpus, threads, pad_id, temperature),
            lambda actor, i: ReferenceHandle(actor, f"reference {i}"),
            groups,
        ).actors
    reward_req = requests.get("reward") or topology.ActorRequest("reward", 1, 0.0, {})
    rewards = start_group(
        RewardWorker,
        reward_req,
        f"{name}-reward",
        lambda i: (spec, str(spec_dir)),
        lambda actor, i: RewardHandle(actor, f"reward worker {i}"),
        groups,
    ).actors

    worlds = [actors] + ([critics] if critics else [])
    masters = wait_all([(g[0].label, g[0].master_address()) for g in worlds], timeout_s, "rendezvous", HINT)
    wait_all(
        [(w.label, w.init_world(m)) for group, m in zip(worlds, masters, strict=True) for w in group]
        + [(a.label, a.ready()) for a in [*rollout_group.actors, *references, *rewards]],
        timeout_s,
        "starting the workers and DeepSpeed",
        HINT,
    )
    weight_sync = WeightSync(spec, rollout_group, actors, requests["actor"].gpus > 0, timeout_s)
    weight_sync.connect()
    return Workers(sampler, rollout_group, actors, weight_sync, critics, references, rewards)
