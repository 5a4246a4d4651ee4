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

from kuberlhf.workers.data import PromptSampler, load_prompts
from kuberlhf.workers.engine_sync import EngineSync
from kuberlhf.workers.faults import wait_all
from kuberlhf.workers.groups import ActorGroup, RewardWorker, create_group, start_group, threads_per_actor
from kuberlhf.workers.rollout import ModelRef, RolloutWorker, local_model
from kuberlhf.workers.trainer import ReferenceWorker, TrainerWorker, train_layout

from kuberlhf import topology
from kuberlhf.api import RLHFJob

HINT = "raise spec.schedule.stepTimeoutSeconds if loading the models legitimately takes longer"


@dataclass
class Workers:
    """A started job: its actors by role, the prompt stream and the rollout engines' weight sync."""

    sampler: PromptSampler
    rollout_group: ActorGroup
    actors: list[Any]
    engine_sync: EngineSync
    critics: list[Any] = field(default_factory=list)
    references: list[Any] = field(default_factory=list)
    rewards: list[Any] = field(default_factory=list)


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
        RolloutWorker, req, f"{name}-rollout", lambda i: (spec, actor_ref, req.gpus, threads), groups
    )

    def trainers(role: str, model: ModelRef) -> list[Any]:
        treq = requests[role]
        return create_group(
            TrainerWorker,
            treq,
            f"{name}-{role}",
            lambda i: (role, spec, model, tok_ref, i, treq.gpus, threads, pad_id),
            groups,
        )

    actors = trainers("actor", actor_ref)
    critics = trainers("critic", critic_ref) if "critic" in requests else []
    references: list[Any] = []
    if "reference" in requests:
        rreq, temperature = requests["reference"], spec.rollout.temperature
        references = create_group(
            ReferenceWorker,
            rreq,
            f"{name}-reference",
            lambda i: (ref_ref, rreq.gpus, threads, pad_id, temperature),
            groups,
        )
    reward_req = requests.get("reward") or topology.ActorRequest("reward", 1, 0.0, {})
    rewards = create_group(
        RewardWorker, reward_req, f"{name}-reward", lambda i: (spec, str(spec_dir)), groups
    )

    worlds = [("actor", actors)] + ([("critic", critics)] if critics else [])
    masters = wait_all(
        [(role, group[0].master_address.remote()) for role, group in worlds], timeout_s, "rendezvous", HINT
    )
    wait_all(
        [
            (f"{role} rank {i}", w.init_world.remote(m))
            for (role, group), m in zip(worlds, masters, strict=True)
            for i, w in enumerate(group)
        ]
        + [(f"rollout engine {i}", a.ready.remote()) for i, a in enumerate(rollout_group.actors)]
        + [(f"reference {i}", a.ready.remote()) for i, a in enumerate(references)]
        + [(f"reward worker {i}", a.ready.remote()) for i, a in enumerate(rewards)],
        timeout_s,
        "starting the workers and DeepSpeed",
        HINT,
    )
    engine_sync = EngineSync(spec, rollout_group, actors, requests["actor"].gpus > 0, timeout_s)
    engine_sync.connect()
    return Workers(sampler, rollout_group, actors, engine_sync, critics, references, rewards)
