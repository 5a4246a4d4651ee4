"""The trainer Ray actor: a DeepSpeed rank running one objective (the actor's, or the critic's).

Every rank of a trainer group is one Ray actor; together they form one data-parallel DeepSpeed
world. Each rank pulls the rollout, rewards, reference log-probs and critic values straight from
the object store (never through the driver), computes the experience for the whole batch itself
(cheap and deterministic, so all ranks agree), and trains on its shard. Old log-probs are the
rollout's behaviour log-probs: in synchronous training the rollout weights are the trainer's, so
no extra forward pass is needed. A rollout correction needs the trainer's own: read off the first
epoch's loss passes when that epoch makes a single optimizer step and nothing is random in the
forward (no dropout), else from one no-grad pass before the update.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from kuberlhf.api import RLHFJobSpec, TrainerRole
from kuberlhf_workers.base.models import ModelRef, local_model, pick_device
from kuberlhf_workers.base.samples import merge_results, shard
from kuberlhf_workers.base.transports import ParamMeta, WeightTransport, free_address
from kuberlhf_workers.training.batch import collate
from kuberlhf_workers.training.experience import Experience, make_experience
from kuberlhf_workers.training.layout import Layout, train_layout
from kuberlhf_workers.training.lora import with_lora
from kuberlhf_workers.training.objectives import OBJECTIVES, PolicyObjective, ValueObjective
from kuberlhf_workers.training.rank import EXPORT_SHARD_BYTES, DeepSpeedRank


def _mean_metrics(items: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for m in items for k in m}
    return {k: sum(float(m[k]) for m in items if k in m) / sum(1 for m in items if k in m) for k in keys}


def has_dropout(model: torch.nn.Module) -> bool:
    """Whether a training forward differs from an eval one: a dropout layer (LoRA's included) or
    transformers' attention dropout with a non-zero rate."""
    layers = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
    configs = [getattr(m, "config", None) for m in model.modules()]
    return layers or any(float(getattr(c, "attention_dropout", 0.0) or 0.0) > 0 for c in configs)


def old_from_loss(layout: Layout, model: torch.nn.Module) -> bool:
    """Whether the first epoch's loss passes see the pre-update weights, deterministically: one
    optimizer step per epoch and no dropout, so their log-probs can stand in for a no-grad pass."""
    return layout.global_batch == layout.rows and not has_dropout(model)


class TrainerWorker:
    """One rank of the `role` trainer group: its objective from `OBJECTIVES`, its world a DeepSpeedRank."""

    def __init__(
        self,
        role: TrainerRole,
        spec: RLHFJobSpec,
        model: ModelRef,
        tokenizer: ModelRef,
        rank: int,
        gpus: float,
        threads: int,
        pad_id: int,
    ):
        if threads:
            torch.set_num_threads(threads)
        self.role, self.spec = role, spec
        self.model_path, self.tokenizer_path = local_model(model), local_model(tokenizer)
        self.pad_id = pad_id
        device = pick_device(gpus)
        self.objective = OBJECTIVES[role](spec, device)
        rows = spec.rollout.prompts_per_step * spec.rollout.samples_per_prompt
        layout = train_layout(rows, self.objective.trainer, role)
        self.rank = DeepSpeedRank(role, self.objective.trainer, layout, rank, device, spec.precision)

    def ready(self) -> bool:
        return True

    def master_address(self) -> tuple[str, int]:
        return free_address()

    def init_world(self, master: tuple[str, int]) -> None:
        """Load the model and join the data-parallel world; all ranks must call this concurrently."""
        build = functools.partial(self.objective.build_model, self.model_path, self.pad_id)
        lora = self.spec.actor.lora if self.role == "actor" else None
        self.rank.join(master, with_lora(build, lora), self.spec.schedule.step_timeout_seconds,
                       self.spec.seed)

    # -- training ---------------------------------------------------------------------------------

    def _experience(
        self,
        rollout_refs: list[Any],
        reward_refs: list[Any],
        ref_refs: list[Any],
        value_refs: list[Any],
        kl_coef: float | None,
    ) -> Experience:
        import ray

        result = merge_results(ray.get(rollout_refs))
        batch = collate(result, self.pad_id)
        if result.episode_rewards is not None:  # spec.environment scored its episodes
            rewards = result.episode_rewards
        else:
            # Each reward replica's share, in row order.
            rewards = [score for part in ray.get(reward_refs) for score in part]
        reward_tensor = torch.as_tensor(rewards, dtype=torch.float32)
        ref_logp = torch.cat(ray.get(ref_refs)) if ref_refs else None
        values = torch.cat(ray.get(value_refs)) if value_refs else None
        return make_experience(self.spec, batch, reward_tensor, ref_logp, values, kl_coef)

    def train(
        self,
        rollout_refs: list[Any],
        rewards: list[Any],
        ref_refs: list[Any],
        value_refs: list[Any],
        kl_coef: float | None = None,
    ) -> dict[str, float]:
        """One update on this rank's shard; rank 0 returns the step's metrics, the others {}.
        `rewards` are the reward replicas' score refs, whose shares concatenate in row order."""
        exp = self._experience(rollout_refs, rewards, ref_refs, value_refs, kl_coef)
        layout, model, device = self.rank.layout, self.rank.model, self.rank.device
        mine = shard(len(exp.batch), self.rank.rank, layout.world)
        step_metrics = []
        if isinstance(self.objective, PolicyObjective) and self.spec.loss.rollout_correction.mode != "off":
            exp.old_logp = torch.zeros_like(exp.batch.behaviour_logp)
            exp.old_from_loss = self._old_from_loss
            if not exp.old_from_loss:
                # One no-grad pass before any update, micro-batch by micro-batch (every rank: ZeRO-3).
                model.eval()
                for start in range(mine.start, mine.stop, layout.micro):
                    rows = slice(start, min(start + layout.micro, mine.stop))
                    exp.old_logp[rows] = self.objective.old_logprobs(model, exp, rows, device)
                model.train()
        for _ in range(self.objective.trainer.epochs):
            for start in range(mine.start, mine.stop, layout.micro):
                rows = slice(start, min(start + layout.micro, mine.stop))
                loss, metrics = self.objective.loss(model, exp, rows, device)
                model.backward(loss)
                model.step()
                step_metrics.append(metrics)
            exp.old_from_loss = False  # the first epoch has read them; later epochs reuse them
        if self.rank.rank != 0:
            return {}
        out = _mean_metrics(step_metrics)
        grad_norm = model.get_global_grad_norm()
        if grad_norm is not None:
            out[f"{self.role}_grad_norm"] = float(grad_norm)
        out.update(self.objective.step_metrics(exp))
        return out

    @functools.cached_property
    def _old_from_loss(self) -> bool:
        """`old_from_loss` for this rank's model, decided once: both are fixed for the run."""
        return old_from_loss(self.rank.layout, self.rank.model)

    def values(self, rollout_refs: list[Any]) -> torch.Tensor:
        """Critic values of this rank's rows (every critic rank is called, as ZeRO-3 needs)."""
        import ray

        if not isinstance(self.objective, ValueObjective):
            raise TypeError(f"the {self.role} objective predicts no values")
        batch = collate(merge_results(ray.get(rollout_refs)), self.pad_id)
        mine = batch.rows(shard(len(batch), self.rank.rank, self.rank.layout.world))
        model = self.rank.model
        model.eval()
        with torch.no_grad():
            values = self.objective.values(model, mine)
        model.train()
        return values.cpu() * mine.response_mask

    # -- weights out ------------------------------------------------------------------------------

    def param_meta(self) -> list[ParamMeta]:
        return self.rank.param_meta()

    def sync_address(self) -> tuple[str, int]:
        return free_address()

    def join_weight_sync(self, sender: WeightTransport) -> None:
        sender.connect()
        self.rank.sender = sender

    def send_weights(self) -> Any:
        """All ranks call this (ZeRO-3 gathers are collective); only rank 0 sends."""
        return self.rank.send_weights(self.spec.weight_sync.bucket_mb * 2**20)

    def parameters(self, master: bool = False) -> dict[str, torch.Tensor]:
        """Full parameters (gathered under ZeRO-3, so every rank must call it); `master`: the fp32
        master weights instead of the module's (bf16 under precision bf16)."""
        return self.rank.parameters(master)

    # -- checkpoints ------------------------------------------------------------------------------

    def save(self, directory: str, hf_dir: str | None) -> None:
        self.rank.save(directory, hf_dir, self.tokenizer_path)

    def load(self, directory: str) -> None:
        self.rank.load(directory)

    def export(self, hf_dir: str, shard_bytes: int | None = None) -> None:
        """The trained model as a from_pretrained folder with its tokenizer (every rank calls it);
        `shard_bytes` caps each weights file (default 2 GiB)."""
        self.rank.export(hf_dir, self.tokenizer_path, shard_bytes or EXPORT_SHARD_BYTES)
