"""The single controller: one RLHFJob spec in, a trained model and checkpoints out.

Per step: prompts → rollout engines → (reward, reference log-probs, critic values) → actor and
critic DeepSpeed updates → weight sync → metrics → checkpoint. Rollouts stay in the object
store: the driver hands their references to the reward worker and the trainers, and only
small metrics come back to it.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kuberlhf import placement, topology
from kuberlhf.api import RLHFJob, RLHFJobSpec, steps_to_train
from kuberlhf.jobrefs import FINAL
from kuberlhf_workers.base.samples import episode_metrics, summarize
from kuberlhf_workers.control import checkpoint as ckpt
from kuberlhf_workers.control.dynamic_sampling import dynamic_rollout
from kuberlhf_workers.control.evaluation import evaluate
from kuberlhf_workers.control.faults import (
    ROLLOUT_RETRIES,
    ActorDied,
    StepFailed,
    wait_all,
    wait_ready,
)
from kuberlhf_workers.control.groups import Placements
from kuberlhf_workers.control.handles import ReferenceHandle, RewardHandle, RolloutHandle, TrainerHandle
from kuberlhf_workers.control.metrics import ProgressCallback
from kuberlhf_workers.control.rollout_queue import (
    PendingRollout,
    generation_requests,
    saved_results,
    to_saved,
)
from kuberlhf_workers.control.weight_sync import WeightSync
from kuberlhf_workers.rewards.sources import describe_reward, reward_budget_s
from kuberlhf_workers.rollout.backend import sleeps_between_rollouts
from kuberlhf_workers.training import algorithms


@dataclass
class Outcome:
    """How a run ended: `completed` (all steps done), `already-complete` (the checkpoint said so,
    nothing trained) or `interrupted` (stopped early after saving)."""

    status: str
    step: int
    total_steps: int
    last_checkpoint: str | None
    history: list[dict[str, float]] = field(default_factory=list)
    model: str | None = None  # the trained model's folder, when not the last checkpoint's model/


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


def _import_model_library() -> None:
    from transformers import AutoTokenizer  # noqa: F401


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
        self.total_steps = max_steps if max_steps is not None else steps_to_train(self.spec)
        self.ray_address, self.resume = ray_address, resume
        # Ray installs its own SIGTERM handler in ray.init; this hook lets the caller put its own
        # back afterwards (a pod's SIGTERM must checkpoint, not kill).
        self.on_ray_started = on_ray_started
        # Called once the run's last checkpoint is published, before the actors go: terminating pods
        # wait for exactly that moment (kuberlhf.shutdown) before Kubernetes SIGTERMs them.
        self.on_stopped: Callable[[], None] | None = None
        self.callbacks = list(callbacks)
        self.ckpt_root = ckpt.resolve_root(self.spec.checkpoint.path, output_dir)
        self.identity = ckpt.job_identity(job)
        self.stop_requested = False
        self.last_checkpoint: str | None = None
        self.placements = Placements(placement.plan_for(self.spec), job.metadata.name)
        self._pending: deque[PendingRollout] = deque()
        self.rollouts: list[RolloutHandle] = []
        self._weight_sync: WeightSync | None = None
        self.synced_step = 0  # updates the rollout engines' weights hold
        self.kl_coef = self.spec.kl.coef  # adaptive KL (kl.target) moves it after every step
        self.step_timeout = self.spec.schedule.step_timeout_seconds
        self.actors: list[TrainerHandle] = []
        self.critics: list[TrainerHandle] = []
        self.references: list[ReferenceHandle] = []
        self.rewards: list[RewardHandle] = []
        self.eval_records: list[dict[str, Any]] = []

    def request_stop(self) -> None:
        """Finish the current step, checkpoint, return (what Ctrl-C does)."""
        self.stop_requested = True

    # -- setup ------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Start every actor group, join the trainer worlds and the weight-sync group (run() calls it)."""
        from kuberlhf_workers.control.startup import start_workers

        local = self.ray_address == "local"
        workers = start_workers(self.job, self.spec_dir, local, self.step_timeout, self.placements)
        self.sampler = workers.sampler
        self.rollouts = workers.rollout_group.actors  # the same list: a replaced engine shows up here
        self.actors, self.critics = workers.actors, workers.critics
        self.references, self.rewards = workers.references, workers.rewards
        self._weight_sync = workers.weight_sync
        self.eval_records = workers.eval_records

    @property
    def weight_sync(self) -> WeightSync:
        if self._weight_sync is None:
            raise RuntimeError("the driver's workers are not started: call setup() first")
        return self._weight_sync

    # -- steps ------------------------------------------------------------------------------------

    def sync_weights(self) -> float:
        """Trainer weights → every rollout engine (replacing dead engines); seconds taken."""
        return self.weight_sync.sync()

    def _generate(self, step: int, round_: int = 0) -> PendingRollout:
        sampler_before = self.sampler.state()
        records = self.sampler.next_batch(self.spec.rollout.prompts_per_step)
        refs, summaries = [], []
        requests = generation_requests(self.spec, step, records, len(self.rollouts), round_)
        for i, request in enumerate(requests):
            engine = self.rollouts[i]
            summary, result = engine.rollout(request)
            refs.append(result)
            summaries.append((engine.label, summary))
        return PendingRollout(step, records, refs, summaries, sampler_before, self.synced_step)

    def _next_rollout(self, step: int, round_: int = 0) -> PendingRollout:
        """This step's rollout; with rollout.offPolicySteps = d, also start generating the next d steps'
        rollouts now, so the engines sample (with weights up to d steps old) while the trainers train."""
        while len(self._pending) <= self.spec.rollout.off_policy_steps:
            upcoming = step + len(self._pending)
            if upcoming >= self.total_steps:
                break
            self._pending.append(self._generate(upcoming, round_))
        pending = self._pending.popleft()
        assert pending.step == step, f"rollout queue out of order: {pending.step} != {step}"
        return pending

    def _rollout(self, step: int, round_: int = 0) -> tuple[PendingRollout, list[dict[str, int]]]:
        """This step's finished rollout and its summaries. A rollout engine that dies is replaced
        (up to ROLLOUT_RETRIES times a step) and the step's prompts are generated again with the
        same seeds, so the data stream neither skips nor repeats."""
        for attempt in range(ROLLOUT_RETRIES + 1):
            pending = self._next_rollout(step, round_)
            try:
                summaries = wait_all(
                    pending.summaries,
                    self.step_timeout,
                    f"rollout of step {step + 1}",
                    "raise spec.schedule.stepTimeoutSeconds, or generate fewer / shorter samples per step",
                )
                return pending, summaries
            except ActorDied as exc:
                if attempt == ROLLOUT_RETRIES:
                    raise StepFailed(
                        f"{exc}; gave up after {ROLLOUT_RETRIES} engine replacements in step {step + 1}"
                    ) from exc
                print(f"step {step + 1}: {exc}; generating the step again", flush=True)
                # Queued rollouts are dropped too (they may sit on the dead engine) and redrawn in order.
                self.sampler.load_state(pending.sampler_before)
                self._pending.clear()
                dead = self.weight_sync.dead()
                if dead:  # none: the engine was only unreachable for a moment
                    self.weight_sync.replace(dead)
        raise AssertionError("unreachable")

    def _engines(self, action: Literal["sleep", "wake_up"], step: int) -> None:
        """Put the rollout engines to sleep around training, when they share the trainers' GPUs.
        Waited for without fetching: an engine that died meanwhile is replaced by the next sync."""
        if not sleeps_between_rollouts(self.spec):
            return
        calls = [engine.sleep() if action == "sleep" else engine.wake_up() for engine in self.rollouts]
        wait_ready(calls, self.step_timeout, f"rollout engines' {action} in step {step + 1}",
                   "raise spec.schedule.stepTimeoutSeconds")

    def sampler_state(self) -> dict[str, int]:
        """The data position after the last trained step (prompts drawn for queued rollouts excluded)."""
        return self._pending[0].sampler_before if self._pending else self.sampler.state()

    def train_step(self, step: int) -> dict[str, float]:
        """One full RL step; returns its metrics (the caller adds checkpoints and callbacks)."""
        started = time.perf_counter()
        restarts_before = self.weight_sync.restarts
        dynamic: dict[str, float] = {}
        if self.spec.rollout.dynamic_sampling.enabled:  # scored round by round, to pick the groups
            pending, summaries, reward_refs, dynamic = dynamic_rollout(
                self.spec, step, self._rollout, self._score, self.synced_step
            )
        else:
            pending, summaries = self._rollout(step)
        records, rollout_refs = pending.records, pending.refs
        t_rollout = time.perf_counter()
        rows = len(records) * self.spec.rollout.samples_per_prompt
        ref_refs = [r.logprobs(rollout_refs, i, len(self.references)) for i, r in enumerate(self.references)]
        value_refs = [c.values(rollout_refs) for c in self.critics]
        # With spec.environment the episodes carry their rewards: there are no reward workers.
        if not self.spec.rollout.dynamic_sampling.enabled:
            reward_refs = self._score(step, records, rollout_refs) if self.spec.environment is None else []
        wait_ready(
            [*ref_refs, *value_refs],
            self.step_timeout,
            f"reference / critic forward of step {step + 1}",
            "raise spec.schedule.stepTimeoutSeconds if a step legitimately takes longer",
        )
        t_reward = time.perf_counter()
        self._engines("sleep", step)  # colocated: the trainers get the GPU memory back
        results = wait_all(
            [
                (t.label, t.train(rollout_refs, reward_refs, ref_refs, value_refs, self.kl_coef))
                for t in [*self.actors, *self.critics]
            ],
            self.step_timeout,
            f"training step {step + 1}",
            "raise spec.schedule.stepTimeoutSeconds if a step legitimately takes longer",
        )
        t_train = time.perf_counter()
        self._engines("wake_up", step)
        sync_s = self.sync_weights()
        self.synced_step = step + 1
        metrics = dict(results[0])
        if self.critics:
            metrics.update(results[len(self.actors)])
        kl = self.spec.kl
        if kl.target is not None:
            metrics["kl_coef"] = self.kl_coef
            self.kl_coef = algorithms.adaptive_kl_coef(
                self.kl_coef, metrics["kl"], kl.target, kl.horizon, rows
            )
        metrics.update(
            time_rollout_s=t_rollout - started,
            time_reward_s=t_reward - t_rollout,
            time_train_s=t_train - t_reward,
            time_sync_s=sync_s,
            samples_per_second=rows / (time.perf_counter() - started),
            # How many updates the trainer is ahead of the weights that sampled this step's rollout.
            policy_lag=step - pending.weights_step,
            rollout_restarts=self.weight_sync.restarts - restarts_before,
            rollout_tokens=sum(s["response_tokens"] for s in summaries),
            **episode_metrics(summaries),
            **dynamic,
        )
        return metrics

    def evaluate(self, step: int) -> dict[str, float]:
        """Sample and score the held-out prompts with the current weights (after this step's sync)."""
        return evaluate(self.spec, step, self.eval_records, self.rollouts, self.rewards, self.step_timeout)

    def _evaluates_at(self, step: int) -> bool:
        every = self.spec.eval.every_steps
        due = step == self.total_steps or (every is not None and step % every == 0)
        return bool(self.eval_records) and due

    def _score(self, step: int, records: list[dict[str, Any]], rollout_refs: list[Any]) -> list[Any]:
        """Every reward replica scores its share of the rows (the trainers concatenate the shares)."""
        reward = self.spec.online_reward()
        rows = len(records) * self.spec.rollout.samples_per_prompt
        spp, replicas = self.spec.rollout.samples_per_prompt, len(self.rewards)
        reward_refs = [w.score(rollout_refs, records, spp, i, replicas) for i, w in enumerate(self.rewards)]
        wait_all(
            [
                (f"{describe_reward(reward)} ({w.label})", ref)
                for w, ref in zip(self.rewards, reward_refs, strict=True)
            ],
            reward_budget_s(reward, rows),
            f"scoring step {step + 1} with the {describe_reward(reward)}",
            f"spec.reward.timeoutSeconds is {reward.timeout_seconds:g}s with maxRetries "
            f"{reward.max_retries}: make the reward faster or raise them",
        )
        return reward_refs

    # -- checkpoints ------------------------------------------------------------------------------

    def save(self, step: int) -> str:
        directory = ckpt.step_dir(self.ckpt_root, step)
        ds_dir, hf_dir = str(directory / "deepspeed"), str(directory / "model")
        wait_all(
            [(a.label, a.save(ds_dir, hf_dir)) for a in self.actors]
            + [(c.label, c.save(ds_dir, None)) for c in self.critics],
            self.step_timeout,
            f"saving checkpoint {directory}",
            "check that the checkpoint volume is writable and not full",
        )
        ahead = [self._snapshot(p) for p in self._pending]
        extra: dict[str, Any] = {"sampler_ahead": self.sampler.state()} if ahead else {}
        if self.spec.kl.target is not None:
            extra["kl_coef"] = self.kl_coef
        if ahead:
            ckpt.write_rollouts_ahead(directory, ahead)
        ckpt.write_state(
            directory,
            ckpt.TrainingState(
                step, self.total_steps, self.sampler_state(), self.spec.seed, extra, self.identity
            ),
        )
        ckpt.publish(self.ckpt_root, directory, self.spec.checkpoint.keep)
        self.last_checkpoint = str(directory)
        return self.last_checkpoint

    def _snapshot(self, pending: PendingRollout) -> dict[str, Any]:
        """A queued rollout as JSON-ready data (fetched once, at checkpoint time only)."""
        results = wait_all(
            [(label, ref) for (label, _), ref in zip(pending.summaries, pending.refs, strict=True)],
            self.step_timeout,
            f"rollout of step {pending.step + 1} (queued, saved with the checkpoint)",
            "raise spec.schedule.stepTimeoutSeconds",
        )
        return to_saved(pending, results)

    def _unsnapshot(self, saved: dict[str, Any]) -> PendingRollout:
        import ray

        results = saved_results(saved)
        summaries = [(f"saved rollout {i}", ray.put(summarize(r))) for i, r in enumerate(results)]
        refs = [ray.put(r) for r in results]
        return PendingRollout(
            saved["step"], saved["records"], refs, summaries, saved["sampler_before"], saved["weights_step"]
        )

    def _resumable(self) -> tuple[Path, ckpt.TrainingState] | None:
        """The newest checkpoint to resume and its state; a ValueError when it is another job's
        (or the spec changed what is trained), so a run never continues someone else's weights."""
        return ckpt.resumable(self.ckpt_root, self.resume, self.identity)

    def _finished_checkpoint(self) -> tuple[int, str] | None:
        """(step, path) of this job's newest checkpoint when it already covers every step to train."""
        found = self._resumable()
        if found is None:
            return None
        directory, state = found
        return (state.step, str(directory)) if state.step >= self.total_steps else None

    def _restore(self) -> int:
        """Load the newest checkpoint into every trainer and the sampler; returns its step."""
        found = self._resumable()
        if found is None:
            return 0
        directory, state = found
        wait_all(
            [(t.label, t.load(str(directory / "deepspeed"))) for t in [*self.actors, *self.critics]],
            self.step_timeout,
            f"loading checkpoint {directory}",
            "check that the checkpoint volume is mounted and readable",
        )
        self.sampler.load_state(state.extra.get("sampler_ahead", state.sampler))
        self.kl_coef = float(state.extra.get("kl_coef", self.kl_coef))
        self._pending.extend(self._unsnapshot(s) for s in ckpt.read_rollouts_ahead(directory))
        self.sync_weights()
        self.synced_step = state.step
        self.last_checkpoint = str(directory)
        return state.step

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> Outcome:
        import ray

        done = self._finished_checkpoint()
        if done is not None:  # nothing to train: say so without starting a single actor
            return Outcome("already-complete", done[0], self.total_steps, done[1])
        # ray.init mostly waits for Ray's own processes to come up: import the model library the
        # driver needs next meanwhile (ray.init itself must stay on the main thread).
        warm = threading.Thread(target=_import_model_library, name="import-transformers", daemon=True)
        warm.start()
        started_ray = start_ray(self.spec, self.ray_address)
        warm.join()
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
                try:
                    metrics = self.train_step(step)
                except (StepFailed, ray.exceptions.RayError) as exc:
                    # A remote error's text carries its whole traceback: keep the cause's message.
                    cause = getattr(exc, "cause", None) or exc
                    what = str(exc) if isinstance(exc, StepFailed) else f"{type(cause).__name__}: {cause}"
                    raise StepFailed(
                        f"step {step + 1}/{self.total_steps}: {what}. Training stopped; run the same "
                        "command again (a RayJob does, up to its backoffLimit) to resume from "
                        f"{self.last_checkpoint or 'step 0 (no checkpoint yet)'}"
                    ) from exc
                step += 1
                if self._evaluates_at(step):
                    metrics.update(self.evaluate(step))
                if step % self.spec.checkpoint.every_steps == 0 or step == self.total_steps:
                    self.save(step)
                    saved_at = step
                history.append({"step": step, **metrics})
                for callback in self.callbacks:
                    callback(step, self.total_steps, metrics, self.last_checkpoint)
            if saved_at != step:
                self.save(step)
            if step < self.total_steps:
                return Outcome("interrupted", step, self.total_steps, self.last_checkpoint, history)
            final = self.output_dir / FINAL
            wait_all([(a.label, a.export(str(final))) for a in self.actors], self.step_timeout,
                     f"writing the final model to {final}", "check that the output folder is writable")
            return Outcome("completed", step, self.total_steps, self.last_checkpoint, history, str(final))
        finally:
            if self.on_stopped is not None:
                self.on_stopped()
            self.release()
            if started_ray:
                ray.shutdown()

    def release(self) -> None:
        """Kill this run's actors and free its placement groups (Ray itself may be shared)."""

        for handle in [*self.rollouts, *self.actors, *self.critics, *self.references, *self.rewards]:
            handle.kill()
        self.placements.remove()
