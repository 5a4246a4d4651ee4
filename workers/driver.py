"""The single controller: one RLHFJob spec in, a trained model and checkpoints out.

Per step: prompts → rollout engines → (reward, reference log-probs, critic values) → actor and
critic DeepSpeed updates → weight sync → metrics → checkpoint. Rollouts stay in the object
store: the driver hands their references to the reward worker and the trainers, and only
small metrics come back to it.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kuberlhf.workers import checkpoint as ckpt
from kuberlhf.workers.generation import GenerationRequest
from kuberlhf.workers.metrics import ProgressCallback
from kuberlhf.workers.weight_sync import make_transports, plan_buckets, resolve_transport

from kuberlhf import topology
from kuberlhf.api import RLHFJob, RLHFJobSpec


@dataclass
class Outcome:
    """How a run ended: `completed` (all steps done), `already-complete` (the checkpoint said so,
    nothing trained) or `interrupted` (stopped early after saving)."""

    status: str
    step: int
    total_steps: int
    last_checkpoint: str | None
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class PendingRollout:
    """A rollout submitted to the engines, with the sampler position from before its prompts."""

    step: int
    records: list[dict[str, Any]]
    refs: list[Any]
    sampler_before: dict[str, int]


def start_ray(spec: RLHFJobSpec, address: str) -> bool:
    """Start a private Ray (local) or join the cluster (auto); True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if address == "local":
        ray.init(
            address="local",
            num_cpus=len(os.sched_getaffinity(0)),
            include_dashboard=False,
            resources=topology.local_resources(spec),
            log_to_driver=False,
        )
    else:
        ray.init(address=address)
    return True


def rollout_seed(seed: int, step: int, engine: int) -> int:
    """Sampling seed of one engine at one step: a resumed run samples exactly as an unbroken one."""
    return (seed * 1_000_003 + step * 7_919 + engine * 104_729) % (2**31 - 1)


def split_prompts(records: list[dict[str, Any]], engines: int) -> list[list[dict[str, Any]]]:
    """Contiguous, near-equal slices of the step's prompts, one per engine (empty ones dropped)."""
    n = len(records)
    parts = [records[n * i // engines : n * (i + 1) // engines] for i in range(engines)]
    return [p for p in parts if p]


class Driver:
    def __init__(
        self,
        job: RLHFJob,
        spec_dir: Path,
        output_dir: Path,
        *,
        max_steps: int | None = None,
        ray_address: str = "local",
        resume: bool = True,
        callbacks: Sequence[ProgressCallback] = (),
        on_ray_started: Callable[[], None] | None = None,
    ):
        self.job, self.spec = job, job.spec
        self.spec_dir, self.output_dir = spec_dir, output_dir
        self.total_steps = max_steps if max_steps is not None else self.spec.schedule.steps
        self.ray_address, self.resume = ray_address, resume
        # Ray installs its own SIGTERM handler in ray.init; this hook lets the caller put its own
        # back afterwards (a pod's SIGTERM must checkpoint, not kill).
        self.on_ray_started = on_ray_started
        self.callbacks = list(callbacks)
        self.ckpt_root = ckpt.resolve_root(self.spec.checkpoint.path, output_dir)
        self.stop_requested = False
        self.last_checkpoint: str | None = None
        self._groups: list[Any] = []
        self.transport = "gloo"
        self._pending: deque[PendingRollout] = deque()
        self.rollouts: list[Any] = []
        self.actors: list[Any] = []
        self.critics: list[Any] = []
        self.references: list[Any] = []
        self.rewards: list[Any] = []

    def request_stop(self) -> None:
        """Finish the current step, checkpoint, return (what Ctrl-C does)."""
        self.stop_requested = True

    # -- setup ------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Start every actor group, join the trainer worlds and the weight-sync group (run() calls it)."""
        from kuberlhf.workers.data import PromptSampler, load_prompts
        from kuberlhf.workers.groups import RewardWorker, create_group, threads_per_actor
        from kuberlhf.workers.rollout import ModelRef, RolloutWorker, local_model
        from kuberlhf.workers.trainer import ReferenceWorker, TrainerWorker, train_layout
        from transformers import AutoTokenizer

        spec = self.spec
        rows = spec.rollout.prompts_per_step * spec.rollout.samples_per_prompt
        train_layout(rows, spec.actor, "actor")  # bad batch arithmetic fails here, naming the field
        if spec.critic is not None:
            train_layout(rows, spec.critic, "critic")
        # Actors get model references, not paths: each resolves its own copy (in a cluster the
        # driver's folders are not on the workers' pods). Resolving here first fails fast on a typo.
        actor_ref = ModelRef(spec.model.actor, "spec.model.actor")
        tok_ref = (
            ModelRef(spec.model.tokenizer, "spec.model.tokenizer") if spec.model.tokenizer else actor_ref
        )
        critic_ref = ModelRef(spec.model.critic, "spec.model.critic") if spec.model.critic else actor_ref
        ref_ref = (
            ModelRef(spec.model.reference, "spec.model.reference") if spec.model.reference else actor_ref
        )
        tok_path = local_model(tok_ref)
        local_model(actor_ref)
        tokenizer = AutoTokenizer.from_pretrained(tok_path)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.sampler = PromptSampler(load_prompts(spec.data, self.spec_dir), spec.seed, spec.data.shuffle)

        local = self.ray_address == "local"
        threads = threads_per_actor(spec, local)
        requests = topology.actor_requests(spec)
        name = self.job.metadata.name
        req = requests["rollout"]
        self.rollouts = create_group(
            RolloutWorker,
            req,
            f"{name}-rollout",
            lambda i: (spec, actor_ref, req.gpus, threads),
            self._groups,
        )
        areq = requests["actor"]
        self.actors = create_group(
            TrainerWorker,
            areq,
            f"{name}-actor",
            lambda i: ("actor", spec, actor_ref, tok_ref, i, areq.gpus, threads, pad_id),
            self._groups,
        )
        if "critic" in requests:
            creq = requests["critic"]
            self.critics = create_group(
                TrainerWorker,
                creq,
                f"{name}-critic",
                lambda i: ("critic", spec, critic_ref, tok_ref, i, creq.gpus, threads, pad_id),
                self._groups,
            )
        if "reference" in requests:
            rreq = requests["reference"]
            temperature = spec.rollout.temperature
            self.references = create_group(
                ReferenceWorker,
                rreq,
                f"{name}-reference",
                lambda i: (ref_ref, rreq.gpus, threads, pad_id, temperature),
                self._groups,
            )
        reward_req = requests.get("reward") or topology.ActorRequest("reward", 1, 0.0, {})
        self.rewards = create_group(
            RewardWorker, reward_req, f"{name}-reward", lambda i: (spec, str(self.spec_dir)), self._groups
        )

        import ray

        ray.get([a.ready.remote() for a in self.rollouts + self.references + self.rewards])
        worlds = [self.actors] + ([self.critics] if self.critics else [])
        masters = ray.get([group[0].master_address.remote() for group in worlds])
        ray.get([w.init_world.remote(m) for group, m in zip(worlds, masters, strict=True) for w in group])
        self._setup_weight_sync(areq.gpus > 0)

    def _setup_weight_sync(self, on_gpu: bool) -> None:
        import ray

        sync = self.spec.weight_sync
        transport = self.transport = resolve_transport(sync.transport, on_gpu)
        plan = plan_buckets(ray.get(self.actors[0].param_meta.remote()), sync.bucket_m_b * 2**20)
        address = ray.get(self.actors[0].sync_address.remote()) if transport != "object-store" else ("", 0)
        sender, receivers = make_transports(
            transport, address, len(self.rollouts), plan, sync.timeout_seconds
        )
        ray.get(
            [self.actors[0].join_weight_sync.remote(sender)]
            + [r.join_weight_sync.remote(rcv) for r, rcv in zip(self.rollouts, receivers, strict=True)]
        )

    # -- steps ------------------------------------------------------------------------------------

    def sync_weights(self) -> float:
        import ray

        started = time.perf_counter()
        sent = [a.send_weights.remote() for a in self.actors]
        # Object store: engines start once rank 0 has put the weights (Ray resolves the ref first).
        # Collective: every member must be inside the broadcast at once, so nothing waits on rank 0.
        payload = sent[0] if self.transport == "object-store" else None
        received = [r.receive_weights.remote(payload) for r in self.rollouts]
        ray.get(sent + received, timeout=self.spec.weight_sync.timeout_seconds)
        return time.perf_counter() - started

    def _generate(self, step: int) -> PendingRollout:
        spec = self.spec
        sampler_before = self.sampler.state()
        records = self.sampler.next_batch(spec.rollout.prompts_per_step)
        refs = []
        for i, part in enumerate(split_prompts(records, len(self.rollouts))):
            request = GenerationRequest(
                prompts=[r["prompt"] for r in part],
                samples_per_prompt=spec.rollout.samples_per_prompt,
                max_new_tokens=spec.data.max_new_tokens,
                temperature=spec.rollout.temperature,
                top_p=spec.rollout.top_p,
                max_prompt_tokens=spec.data.max_prompt_tokens,
                seed=rollout_seed(spec.seed, step, i),
            )
            refs.append(self.rollouts[i].generate.remote(request))
        return PendingRollout(step, records, refs, sampler_before)

    def _next_rollout(self, step: int) -> PendingRollout:
        """This step's rollout; with rollout.offPolicySteps = d, also start generating the next d steps'
        rollouts now, so the engines sample (with weights up to d steps old) while the trainers train."""
        while len(self._pending) <= self.spec.rollout.off_policy_steps:
            upcoming = step + len(self._pending)
            if upcoming >= self.total_steps:
                break
            self._pending.append(self._generate(upcoming))
        pending = self._pending.popleft()
        assert pending.step == step, f"rollout queue out of order: {pending.step} != {step}"
        return pending

    def sampler_state(self) -> dict[str, int]:
        """The data position after the last trained step (prompts drawn for queued rollouts excluded)."""
        return self._pending[0].sampler_before if self._pending else self.sampler.state()

    def train_step(self, step: int) -> dict[str, float]:
        """One full RL step; returns its metrics (the caller adds checkpoints and callbacks)."""
        import ray

        started = time.perf_counter()
        pending = self._next_rollout(step)
        records, rollout_refs = pending.records, pending.refs
        ray.wait(rollout_refs, num_returns=len(rollout_refs), fetch_local=False)
        t_rollout = time.perf_counter()
        reward_ref = self.rewards[0].score.remote(rollout_refs, records, self.spec.rollout.samples_per_prompt)
        ref_refs = [
            r.logprobs.remote(rollout_refs, i, len(self.references)) for i, r in enumerate(self.references)
        ]
        value_refs = [c.values.remote(rollout_refs) for c in self.critics]
        ray.wait(
            [reward_ref, *ref_refs, *value_refs],
            num_returns=1 + len(ref_refs) + len(value_refs),
            fetch_local=False,
        )
        t_reward = time.perf_counter()
        trained = [
            t.train.remote(rollout_refs, reward_ref, ref_refs, value_refs) for t in self.actors + self.critics
        ]
        results = ray.get(trained)
        t_train = time.perf_counter()
        sync_s = self.sync_weights()
        metrics = dict(results[0])
        if self.critics:
            metrics.update(results[len(self.actors)])
        rows = len(records) * self.spec.rollout.samples_per_prompt
        metrics.update(
            time_rollout_s=t_rollout - started,
            time_reward_s=t_reward - t_rollout,
            time_train_s=t_train - t_reward,
            time_sync_s=sync_s,
            samples_per_second=rows / (time.perf_counter() - started),
        )
        return metrics

    # -- checkpoints ------------------------------------------------------------------------------

    def save(self, step: int) -> str:
        import ray

        directory = ckpt.step_dir(self.ckpt_root, step)
        ds_dir, hf_dir = str(directory / "deepspeed"), str(directory / "model")
        ray.get(
            [a.save.remote(ds_dir, hf_dir) for a in self.actors]
            + [c.save.remote(ds_dir, None) for c in self.critics]
        )
        ckpt.write_state(
            directory, ckpt.TrainingState(step, self.total_steps, self.sampler_state(), self.spec.seed)
        )
        ckpt.publish(self.ckpt_root, directory, self.spec.checkpoint.keep)
        self.last_checkpoint = str(directory)
        return self.last_checkpoint

    def _finished_checkpoint(self) -> tuple[int, str] | None:
        """(step, path) of the newest checkpoint when it already covers every step to train."""
        directory = ckpt.latest(self.ckpt_root) if self.resume else None
        if directory is None:
            return None
        step = ckpt.read_state(directory).step
        return (step, str(directory)) if step >= self.total_steps else None

    def _restore(self) -> int:
        """Load the newest checkpoint into every trainer and the sampler; returns its step."""
        import ray

        directory = ckpt.latest(self.ckpt_root) if self.resume else None
        if directory is None:
            return 0
        state = ckpt.read_state(directory)
        ray.get([t.load.remote(str(directory / "deepspeed")) for t in self.actors + self.critics])
        self.sampler.load_state(state.sampler)
        self.sync_weights()
        self.last_checkpoint = str(directory)
        return state.step

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> Outcome:
        import ray

        done = self._finished_checkpoint()
        if done is not None:  # nothing to train: say so without starting a single actor
            return Outcome("already-complete", done[0], self.total_steps, done[1])
        started_ray = start_ray(self.spec, self.ray_address)
        if self.on_ray_started is not None:
            self.on_ray_started()
        try:
            self.setup()
            step = self._restore()
            if step >= self.total_steps:
                return Outcome("already-complete", step, self.total_steps, self.last_checkpoint)
            history = []
            saved_at = step
            while step < self.total_steps and not self.stop_requested:
                metrics = self.train_step(step)
                step += 1
                if step % self.spec.checkpoint.every_steps == 0 or step == self.total_steps:
                    self.save(step)
                    saved_at = step
                history.append({"step": step, **metrics})
                for callback in self.callbacks:
                    callback(step, self.total_steps, metrics, self.last_checkpoint)
            if saved_at != step:
                self.save(step)
            status = "completed" if step >= self.total_steps else "interrupted"
            return Outcome(status, step, self.total_steps, self.last_checkpoint, history)
        finally:
            self.release()
            if started_ray:
                ray.shutdown()

    def release(self) -> None:
        """Kill this run's actors and free its placement groups (Ray itself may be shared)."""
        import ray

        for actor in self.rollouts + self.actors + self.critics + self.references + self.rewards:
            ray.kill(actor)
        for group in self._groups:
            ray.util.remove_placement_group(group)
