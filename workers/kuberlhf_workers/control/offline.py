"""The offline program (sft, rm, dpo): a dataset in, a trained model in OUTPUT/final out.

A sibling of the RL driver, as OpenRLHF's offline trainers are of its PPO one: no engines, no
rewards, no weight sync. The driver renders data.train (and data.eval) to token ids once, then
each step draws one global batch of records (seeded, epoch by epoch), hands it to every rank
through the object store and collects rank 0's metrics. Checkpoints, resume, the progress line,
metrics.jsonl, TensorBoard and the RLHFJob status work as in the RL program.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kuberlhf import placement
from kuberlhf.api import RLHFJob, steps_to_train
from kuberlhf.files import find_spec_file
from kuberlhf.jobrefs import FINAL
from kuberlhf.seats import seats_for
from kuberlhf_workers.base.data import PromptSampler
from kuberlhf_workers.base.models import ModelRef, local_tokenizer
from kuberlhf_workers.base.records import Example, Kind, Renderer, load_examples
from kuberlhf_workers.control import checkpoint as ckpt
from kuberlhf_workers.control.driver import Outcome, start_ray
from kuberlhf_workers.control.faults import StepFailed, wait_all
from kuberlhf_workers.control.groups import Placements, start_group, threads_per_actor
from kuberlhf_workers.control.handles import OfflineTrainerHandle
from kuberlhf_workers.control.metrics import ProgressCallback
from kuberlhf_workers.training.offline import OfflineTrainerWorker, batch_size, combine

HINT = "raise spec.schedule.stepTimeoutSeconds if a step legitimately takes longer"


class OfflineDriver:
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
        self.max_steps, self.ray_address, self.resume = max_steps, ray_address, resume
        self.callbacks = list(callbacks)
        self.on_ray_started = on_ray_started
        self.on_stopped: Callable[[], None] | None = None  # as Driver's: the checkpoint is published
        self.ckpt_root = ckpt.resolve_root(self.spec.checkpoint.path, output_dir)
        self.identity = ckpt.job_identity(job)
        self.step_timeout = self.spec.schedule.step_timeout_seconds
        self.placements = Placements(placement.plan_for(self.spec), job.metadata.name)
        self.stop_requested = False
        self.last_checkpoint: str | None = None
        self.trainers: list[OfflineTrainerHandle] = []
        self.train_set: list[Example] = []
        self.eval_set: list[Example] = []

    def request_stop(self) -> None:
        """Finish the current step, checkpoint, return (what Ctrl-C and SIGTERM do)."""
        self.stop_requested = True

    # -- data -------------------------------------------------------------------------------------

    def load_data(self) -> None:
        """Render data.train / data.eval with the actor's tokenizer (before any actor starts, so a
        bad record fails naming its file and line)."""
        from transformers import AutoTokenizer

        spec = self.spec
        tokenizer = AutoTokenizer.from_pretrained(local_tokenizer(self._tokenizer_ref()))
        renderer = Renderer(tokenizer, spec.data.chat_template, spec.data.max_length)
        kind: Kind = "sft" if spec.algorithm == "sft" else "pairs"

        def path_of(value: str) -> Path:
            path = Path(value).expanduser()
            return find_spec_file(path, self.spec_dir) or self.spec_dir / path

        assert spec.data.train is not None  # the API's rules require it offline
        self.train_set = load_examples(path_of(spec.data.train), "spec.data.train", kind, renderer)
        if spec.data.eval is not None:
            self.eval_set = load_examples(path_of(spec.data.eval), "spec.data.eval", kind, renderer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.total_steps = self.max_steps or steps_to_train(spec, len(self.train_set))
        self.sampler = PromptSampler(
            [{"index": i} for i in range(len(self.train_set))], spec.seed, spec.data.shuffle
        )

    def _tokenizer_ref(self) -> ModelRef:
        model = self.spec.model
        return ModelRef(model.tokenizer, "spec.model.tokenizer") if model.tokenizer else self._actor_ref()

    def _actor_ref(self) -> ModelRef:
        return ModelRef(self.spec.model.actor, "spec.model.actor")

    # -- workers ----------------------------------------------------------------------------------

    def setup(self) -> None:
        spec, plan = self.spec, self.placements.plan
        if plan.problems:
            raise ValueError("; ".join(plan.problems))
        seats = seats_for(plan, spec, "actor")
        threads = threads_per_actor(spec, self.ray_address == "local")
        reference = ModelRef(spec.model.reference, "spec.model.reference") if spec.model.reference else None
        actor, tokenizer, pad_id = self._actor_ref(), self._tokenizer_ref(), self.pad_id
        self.trainers = start_group(
            OfflineTrainerWorker,
            seats,
            self.placements,
            lambda i: (spec, actor, tokenizer, reference, i, seats[i].gpus, threads, pad_id),
            lambda handle, i: OfflineTrainerHandle(handle, f"{spec.algorithm} rank {i}"),
        ).actors
        [master] = wait_all(
            [(self.trainers[0].label, self.trainers[0].master_address())],
            self.step_timeout,
            "rendezvous",
            HINT,
        )
        wait_all(
            [(t.label, t.init_world(master)) for t in self.trainers],
            self.step_timeout,
            "loading the model and starting DeepSpeed",
            HINT,
        )

    # -- steps ------------------------------------------------------------------------------------

    def train_step(self, step: int) -> dict[str, float]:
        import ray

        started = time.perf_counter()
        picked = [self.train_set[r["index"]] for r in self.sampler.next_batch(batch_size(self.spec))]
        batch = ray.put(picked)
        results = wait_all(
            [(t.label, t.train(batch)) for t in self.trainers],
            self.step_timeout,
            f"training step {step + 1}",
            HINT,
        )
        metrics = dict(results[0])
        elapsed = time.perf_counter() - started
        metrics.update(
            time_train_s=elapsed,
            samples_per_second=len(picked) / elapsed,
            truncated=float(sum(e.truncated for e in picked)),
            epoch=float(self.sampler.state()["epoch"]),
        )
        return metrics

    def evaluate(self, step: int) -> dict[str, float]:
        import ray

        if not self.eval_set:
            return {}
        examples = ray.put(self.eval_set)
        parts = wait_all(
            [(t.label, t.evaluate(examples)) for t in self.trainers],
            self.step_timeout,
            f"evaluation after step {step}",
            HINT,
        )
        return combine(parts)

    def _evaluates_at(self, step: int) -> bool:
        every = self.spec.eval.every_steps
        return step == self.total_steps or (every is not None and step % every == 0)

    # -- checkpoints ------------------------------------------------------------------------------

    def save(self, step: int) -> str:
        directory = ckpt.step_dir(self.ckpt_root, step)
        ds_dir, hf_dir = str(directory / "deepspeed"), str(directory / "model")
        wait_all(
            [(t.label, t.save(ds_dir, hf_dir)) for t in self.trainers],
            self.step_timeout,
            f"saving checkpoint {directory}",
            "check that the checkpoint volume is writable and not full",
        )
        state = ckpt.TrainingState(
            step, self.total_steps, self.sampler.state(), self.spec.seed, {}, self.identity
        )
        ckpt.write_state(directory, state)
        ckpt.publish(self.ckpt_root, directory, self.spec.checkpoint.keep)
        self.last_checkpoint = str(directory)
        return self.last_checkpoint

    def _resumable(self) -> tuple[Path, ckpt.TrainingState] | None:
        return ckpt.resumable(self.ckpt_root, self.resume, self.identity)

    def _restore(self) -> int:
        found = self._resumable()
        if found is None:
            return 0
        directory, state = found
        wait_all(
            [(t.label, t.load(str(directory / "deepspeed"))) for t in self.trainers],
            self.step_timeout,
            f"loading checkpoint {directory}",
            "check that the checkpoint volume is mounted and readable",
        )
        self.sampler.load_state(state.sampler)
        self.last_checkpoint = str(directory)
        return state.step

    def export(self) -> Path:
        final = self.output_dir / FINAL
        wait_all(
            [(t.label, t.export(str(final))) for t in self.trainers],
            self.step_timeout,
            f"writing the final model to {final}",
            "check that the output folder is writable",
        )
        return final

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> Outcome:
        import ray

        self.load_data()
        found = self._resumable()
        if found is not None and found[1].step >= self.total_steps:
            return Outcome("already-complete", found[1].step, self.total_steps, str(found[0]))
        started_ray = start_ray(self.spec, self.ray_address)
        if self.on_ray_started is not None:
            self.on_ray_started()
        try:
            self.setup()
            step = self._restore()
            history: list[dict[str, Any]] = []
            saved_at = step
            while step < self.total_steps and not self.stop_requested:
                try:
                    metrics = self.train_step(step)
                    if self._evaluates_at(step + 1):
                        metrics.update(self.evaluate(step + 1))
                except (StepFailed, ray.exceptions.RayError) as exc:
                    cause = getattr(exc, "cause", None) or exc
                    what = str(exc) if isinstance(exc, StepFailed) else f"{type(cause).__name__}: {cause}"
                    raise StepFailed(
                        f"step {step + 1}/{self.total_steps}: {what}. Training stopped; run the same command "
                        f"again to resume from {self.last_checkpoint or 'step 0 (no checkpoint yet)'}"
                    ) from exc
                step += 1
                if step % self.spec.checkpoint.every_steps == 0 or step == self.total_steps:
                    self.save(step)
                    saved_at = step
                history.append({"step": step, **metrics})
                for callback in self.callbacks:
                    callback(step, self.total_steps, metrics, self.last_checkpoint)
            if saved_at != step:
                self.save(step)
            if step >= self.total_steps:
                final = self.export()
                return Outcome("completed", step, self.total_steps, self.last_checkpoint, history, str(final))
            return Outcome("interrupted", step, self.total_steps, self.last_checkpoint, history)
        finally:
            if self.on_stopped is not None:
                self.on_stopped()
            for trainer in self.trainers:
                trainer.kill()
            self.placements.remove()
            if started_ray:
                ray.shutdown()
