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

from kuberlhf.api import RLHFJob, TrainerRole
from kuberlhf.seats import seats_for
from kuberlhf_workers.base.data import PromptStream, load_source
from kuberlhf_workers.base.mixing import open_prompts
from kuberlhf_workers.base.models import ModelRef, local_tokenizer
from kuberlhf_workers.base.records import chat_enabled, chat_prompt
from kuberlhf_workers.control.faults import wait_all
from kuberlhf_workers.control.groups import ActorGroup, Placements, start_group, threads_per_actor
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

    sampler: PromptStream
    rollout_group: ActorGroup[RolloutHandle]
    actors: list[TrainerHandle]
    weight_sync: WeightSync
    critics: list[TrainerHandle] = field(default_factory=list)
    references: list[ReferenceHandle] = field(default_factory=list)
    rewards: list[RewardHandle] = field(default_factory=list)
    eval_records: list[dict[str, Any]] = field(default_factory=list)  # spec.eval.prompts


def start_workers(
    job: RLHFJob, spec_dir: Path, local: bool, timeout_s: float, placements: Placements
) -> Workers:
    """Start everything a step needs in the seats of `placements`' plan (the caller removes its
    placement groups). Bad batch arithmetic and unknown models fail here, naming the field,
    before any actor."""
    from transformers import AutoTokenizer

    spec = job.spec
    plan = placements.plan
    if plan.problems:
        raise ValueError("; ".join(plan.problems))
    rows = spec.rollout.prompts_per_step * spec.rollout.samples_per_prompt
    train_layout(rows, spec.actor, "actor")
    if spec.critic is not None:
        train_layout(rows, spec.critic, "critic")
    # Actors get model references, not paths: each resolves its own copy (in a cluster the
    # driver's folders are not on the workers' pods). Resolving the actor's config and tokenizer
    # here fails fast on a typo without fetching weights the driver never loads.
    actor_ref = ModelRef(spec.model.actor, "spec.model.actor")
    tok_ref = ModelRef(spec.model.tokenizer, "spec.model.tokenizer") if spec.model.tokenizer else actor_ref
    critic_ref = ModelRef(spec.model.critic, "spec.model.critic") if spec.model.critic else actor_ref
    ref_ref = ModelRef(spec.model.reference, "spec.model.reference") if spec.model.reference else actor_ref
    tokenizer = AutoTokenizer.from_pretrained(local_tokenizer(tok_ref))
    local_tokenizer(actor_ref)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    chat = (lambda m: chat_prompt(tokenizer, m)) if chat_enabled(tokenizer, spec.data.chat_template) else None
    sampler = open_prompts(spec.data, spec_dir, spec.seed, chat)
    eval_records = (
        load_source(spec.eval.prompts, spec.data.prompt_key, spec_dir, chat, "spec.eval.prompts")
        if spec.eval.prompts is not None else []
    )

    threads = threads_per_actor(spec, local)
    rollout_seats = seats_for(plan, spec, "rollout")
    rollout_group = start_group(
        RolloutWorker,
        rollout_seats,
        placements,
        lambda i: (spec, actor_ref, rollout_seats[i].gpus, threads, str(spec_dir)),
        lambda actor, i: RolloutHandle(actor, f"rollout engine {i}"),
    )

    def trainers(role: TrainerRole, model: ModelRef) -> list[TrainerHandle]:
        role_seats = seats_for(plan, spec, role)
        return start_group(
            TrainerWorker,
            role_seats,
            placements,
            lambda i: (role, spec, model, tok_ref, i, role_seats[i].gpus, threads, pad_id),
            lambda actor, i: TrainerHandle(actor, f"{role} rank {i}"),
        ).actors

    actors = trainers("actor", actor_ref)
    critics = trainers("critic", critic_ref) if plan.ranks_of("critic") else []
    references: list[ReferenceHandle] = []
    if plan.ranks_of("reference"):
        ref_seats, temperature = seats_for(plan, spec, "reference"), spec.rollout.temperature
        references = start_group(
            ReferenceWorker,
            ref_seats,
            placements,
            lambda i: (
                ref_ref, ref_seats[i].gpus, threads, pad_id, temperature, spec.actor.micro_batch_size,
                spec.precision, spec.reference.zero_stage, i, len(ref_seats), spec.actor.padding,
            ),
            lambda actor, i: ReferenceHandle(actor, f"reference {i}"),
        ).actors
    reward_seats = seats_for(plan, spec, "reward")
    rewards = start_group(
        RewardWorker,
        reward_seats,
        placements,
        lambda i: (spec, str(spec_dir), reward_seats[i].gpus),
        lambda actor, i: RewardHandle(actor, f"reward worker {i}"),
    ).actors

    # One DeepSpeed world per trainer role, and one of its own for a ZeRO-3 (sharded) reference;
    # each meets at its rank 0's address, fetched for all worlds at once and kept by world name.
    sharded_refs = references if spec.reference.zero_stage == 3 else []
    worlds: dict[str, list[TrainerHandle] | list[ReferenceHandle]] = {
        "actor": actors, "critic": critics, "reference": sharded_refs,
    }
    leaders = {name: group[0] for name, group in worlds.items() if group}
    asked = [(h.label, h.master_address()) for h in leaders.values()]
    masters = dict(zip(leaders, wait_all(asked, timeout_s, "rendezvous", HINT), strict=True))
    joins = [(w.label, w.init_world(masters["actor"])) for w in actors]
    joins += [(w.label, w.init_world(masters["critic"])) for w in critics]
    joins += [(r.label, r.init_world(masters["reference"], timeout_s)) for r in sharded_refs]
    others = [*rollout_group.actors, *rewards, *([] if sharded_refs else references)]
    wait_all(
        joins + [(a.label, a.ready()) for a in others],
        timeout_s,
        "starting the workers and DeepSpeed",
        HINT,
    )
    weight_sync = WeightSync(spec, rollout_group, actors, timeout_s)
    weight_sync.connect()
    return Workers(sampler, rollout_group, actors, weight_sync, critics, references, rewards, eval_records)
