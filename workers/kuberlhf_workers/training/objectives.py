"""What a DeepSpeed trainer group optimises: one small interface, one table.

The rank (`training.rank`) owns the world, checkpoints and weights; an objective owns the model
head and the loss. A new loss over the same DeepSpeed ranks (an SFT, reward-model or DPO
objective) is a new class here and a row in `OBJECTIVES`, not a branch in the trainer; the
controller program that feeds it batches is chosen in `control.run.PROGRAMS`.
"""

from __future__ import annotations

from typing import Protocol

import torch

from kuberlhf.api import ALGORITHMS, RLHFJobSpec, TrainerRole, TrainerSpec, sequence_tokens
from kuberlhf_workers.base.precision import compute_dtype
from kuberlhf_workers.training import algorithms, padding
from kuberlhf_workers.training.batch import Batch, response_logprobs
from kuberlhf_workers.training.experience import Experience, batch_metrics

Metrics = dict[str, float]
CPU = torch.device("cpu")


class Objective(Protocol):
    """A loss over micro-batches of an `Experience`, and the model it trains."""

    trainer: TrainerSpec  # the spec section that sizes this group (replicas, ZeRO, learning rate)
    layout: padding.Layout  # how its micro-batches go through the model (trainer.padding, resolved)

    def build_model(self, path: str, pad_id: int) -> torch.nn.Module:
        """The trainable model, loaded in fp32 (DeepSpeed casts for its mixed precision)."""
        ...

    def loss(
        self, model: torch.nn.Module, exp: Experience, rows: slice, device: torch.device
    ) -> tuple[torch.Tensor, Metrics]:
        """The loss of rows `rows` of the batch and its metrics (averaged over micro-batches)."""
        ...

    def step_metrics(self, exp: Experience) -> Metrics:
        """Metrics of the whole step that rank 0 reports besides the averaged loss metrics."""
        ...


def _layout(spec: RLHFJobSpec, trainer: TrainerSpec, device: torch.device) -> padding.Layout:
    return padding.resolve(trainer.padding, device, compute_dtype(spec.precision, device))


def _attention(spec: RLHFJobSpec, layout: padding.Layout, device: torch.device) -> dict[str, str]:
    kernel = padding.training_attention(layout, device, sequence_tokens(spec))
    return {} if kernel is None else {"attn_implementation": kernel}


class PolicyObjective:
    """The actor: PPO's clipped surrogate with the algorithm's aggregation, plus an optional KL loss.
    `device`: where the rank computes, which decides what spec.actor.padding resolves to."""

    def __init__(self, spec: RLHFJobSpec, device: torch.device = CPU):
        self.spec = spec
        self.trainer: TrainerSpec = spec.actor
        self.layout = _layout(spec, self.trainer, device)
        self.attention = _attention(spec, self.layout, device)
        self.bucket_rows = padding.BUCKET_ROWS

    def build_model(self, path: str, pad_id: int) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, **self.attention
        )
        return model

    def scores(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """The logits that predicted each response token ([B, T, V]), through the layout."""
        return padding.response_outputs(model, batch, self.layout, bucket_rows=self.bucket_rows)

    def loss(
        self, model: torch.nn.Module, exp: Experience, rows: slice, device: torch.device
    ) -> tuple[torch.Tensor, Metrics]:
        mb = exp.batch.rows(rows)
        mask = mb.response_mask.to(device)
        scores = self.scores(model, mb)
        logp = response_logprobs(scores, mb, self.spec.rollout.temperature)
        loss_spec = self.spec.loss
        behaviour = mb.behaviour_logp.to(device)
        if exp.old_from_loss and exp.old_logp is not None:
            exp.old_logp[rows] = logp.detach().cpu()
        old = exp.old_logp[rows].to(device) if exp.old_logp is not None else behaviour
        loss, metrics = algorithms.policy_loss(
            logp,
            old,
            exp.advantages[rows].to(device),
            mask,
            loss_spec.clip_range,
            loss_spec.clip_range_high or loss_spec.clip_range,
            algorithms.loss_aggregation(self.spec.algorithm),
            norm_len=self.spec.data.max_new_tokens,
            dual_clip=loss_spec.dual_clip,
            level="sequence" if loss_spec.policy_loss_type == "gspo" else "token",
            rollout_logp=behaviour,
            correction=loss_spec.rollout_correction.mode,
            correction_bounds=(loss_spec.rollout_correction.low, loss_spec.rollout_correction.high),
        )
        if exp.ref_logp is not None and self.spec.kl.mode == "loss":
            kl_term = algorithms.kl_loss(logp, exp.ref_logp[rows].to(device), mask, self.spec.kl.estimator)
            loss = loss + exp.kl_coef * kl_term
        if loss_spec.entropy_coef > 0:
            temperature = self.spec.rollout.temperature
            entropy = algorithms.entropy(scores / temperature if temperature > 0 else scores, mask)
            loss = loss - loss_spec.entropy_coef * entropy
            metrics["entropy"] = float(entropy.detach())
        return loss, {k: float(v) for k, v in metrics.items()} | {"policy_loss": float(loss.detach())}

    def step_metrics(self, exp: Experience) -> Metrics:
        group = ALGORITHMS[self.spec.algorithm].group_baseline
        return batch_metrics(exp, self.spec.rollout.samples_per_prompt if group else None)

    def old_logprobs(
        self, model: torch.nn.Module, exp: Experience, rows: slice, device: torch.device
    ) -> torch.Tensor:
        """The trainer's log-probs of rows `rows` before the update (no gradient), which a rollout
        correction weighs against the engine's."""
        mb = exp.batch.rows(rows)
        with torch.no_grad():
            return response_logprobs(self.scores(model, mb), mb, self.spec.rollout.temperature).cpu()


class ValueObjective:
    """The critic (ppo): an LM body with a one-unit value head, trained with the clipped value loss."""

    def __init__(self, spec: RLHFJobSpec, device: torch.device = CPU):
        self.spec = spec
        self.trainer = spec.critic or spec.actor
        self.layout = _layout(spec, self.trainer, device)
        self.attention = _attention(spec, self.layout, device)
        self.bucket_rows = padding.BUCKET_ROWS

    def build_model(self, path: str, pad_id: int) -> torch.nn.Module:
        from transformers import AutoModelForTokenClassification

        model = AutoModelForTokenClassification.from_pretrained(
            path, num_labels=1, dtype=torch.float32, **self.attention
        )
        model.config.pad_token_id = pad_id
        module: torch.nn.Module = model
        return module

    def values(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Value of the state in which each response token was chosen ([B, T])."""
        return padding.response_outputs(
            model, batch, self.layout, causal_lm=False, bucket_rows=self.bucket_rows
        ).squeeze(-1).float()

    def loss(
        self, model: torch.nn.Module, exp: Experience, rows: slice, device: torch.device
    ) -> tuple[torch.Tensor, Metrics]:
        mb = exp.batch.rows(rows)
        if exp.returns is None or exp.values is None:
            raise ValueError(f"spec.algorithm: {self.spec.algorithm} computes no returns for a critic")
        loss = algorithms.value_loss(
            self.values(model, mb),
            exp.values[rows].to(device),
            exp.returns[rows].to(device),
            mb.response_mask.to(device),
            self.spec.loss.value_clip_range,
        )
        return loss, {"value_loss": float(loss.detach())}

    def step_metrics(self, exp: Experience) -> Metrics:
        return {}


class ObjectiveFactory(Protocol):
    def __call__(self, spec: RLHFJobSpec, device: torch.device = ...) -> Objective: ...


OBJECTIVES: dict[TrainerRole, ObjectiveFactory] = {
    "actor": PolicyObjective,
    "critic": ValueObjective,
}
