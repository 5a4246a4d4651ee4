"""Offline objectives (sft, rm, dpo) and the trainer rank that runs them.

OpenRLHF's offline trainers are sibling programs of its RL one; here they are sibling objectives
on the same DeepSpeed rank (`training.rank`): the rank owns the world, ZeRO, checkpoints and
exports, an objective owns the model head and the loss, and `OFFLINE_OBJECTIVES` maps an
algorithm to its objective. The batches are token ids rendered by the driver (`base.records`),
so this module never sees text.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Protocol

import torch

from kuberlhf.api import DPOSpec, RLHFJobSpec, TrainerSpec
from kuberlhf_workers.base.models import ModelRef, local_model, pick_device
from kuberlhf_workers.base.records import Example, Sequence
from kuberlhf_workers.base.samples import GenerationResult, shard
from kuberlhf_workers.base.transports import free_address
from kuberlhf_workers.training.algorithms import dpo_loss, pairwise_loss, sft_loss
from kuberlhf_workers.training.batch import Batch, collate, token_logprobs
from kuberlhf_workers.training.forward import forward_logits
from kuberlhf_workers.training.layout import train_layout
from kuberlhf_workers.training.lora import with_lora
from kuberlhf_workers.training.packing import pack, packed_logprobs
from kuberlhf_workers.training.rank import DeepSpeedRank

Metrics = dict[str, float]


def sequence_batch(seqs: list[Sequence], pad_id: int) -> Batch:
    """Prompts left-padded, responses right-padded (the rollout layout, so the same log-prob
    slicing applies); the response mask marks the tokens a loss is taken on."""
    n = len(seqs)
    result = GenerationResult(
        [""] * n,
        [""] * n,
        [s.prompt for s in seqs],
        [s.response for s in seqs],
        [[0.0] * len(s.response) for s in seqs],
        [True] * n,
    )
    return collate(result, pad_id)


def sequence_logprobs(model: torch.nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    """Summed log-prob of each row's response ([B])."""
    logp = token_logprobs(forward_logits(model, batch), batch, 1.0)
    return (logp * batch.response_mask.to(device)).sum(-1)


class OfflineObjective(Protocol):
    """A loss over micro-batches of examples, and the model it trains."""

    trainer: TrainerSpec

    def build_model(self, path: str, pad_id: int) -> torch.nn.Module:
        """The trainable model, in fp32 (DeepSpeed casts for its mixed precision)."""
        ...

    def loss(
        self, model: torch.nn.Module, examples: list[Example], device: torch.device
    ) -> tuple[torch.Tensor, Metrics]:
        """The loss of a micro-batch and its metrics (averaged over micro-batches)."""
        ...

    def evaluate(self, model: torch.nn.Module, examples: list[Example], device: torch.device) -> Metrics:
        """Sums over `examples` (key "count" included), so shards and micro-batches add up."""
        ...


def _causal_lm(path: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model


class SFTObjective:
    """Next-token likelihood of the responses only (prompt tokens are context, not targets)."""

    def __init__(self, spec: RLHFJobSpec, pad_id: int, reference: str | None = None):
        self.trainer: TrainerSpec = spec.actor
        self.pad_id = pad_id
        self.packing = spec.data.max_length if spec.data.packing else None

    def build_model(self, path: str, pad_id: int) -> torch.nn.Module:
        return _causal_lm(path)

    def _nll(
        self, model: torch.nn.Module, examples: list[Example], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.packing is not None:
            packed = pack([e.chosen for e in examples], self.packing, self.pad_id)
            out = model(input_ids=packed.input_ids.to(device), position_ids=packed.position_ids.to(device),
                        attention_mask=None, use_cache=False)
            mask = packed.target_mask.to(device)
            return sft_loss(packed_logprobs(out.logits, packed), mask), mask.sum()
        batch = sequence_batch([e.chosen for e in examples], self.pad_id)
        logp = token_logprobs(forward_logits(model, batch), batch, 1.0)
        mask = batch.response_mask.to(device)
        return sft_loss(logp, mask), mask.sum()

    def loss(
        self, model: torch.nn.Module, examples: list[Example], device: torch.device
    ) -> tuple[torch.Tensor, Metrics]:
        loss, tokens = self._nll(model, examples, device)
        return loss, {"loss": float(loss.detach()), "response_tokens": float(tokens)}

    def evaluate(self, model: torch.nn.Module, examples: list[Example], device: torch.device) -> Metrics:
        loss, tokens = self._nll(model, examples, device)
        return {"count": float(tokens), "eval_loss": float(loss) * float(tokens)}  # a token mean overall


class RewardModelObjective:
    """A scalar head on the LM body, trained so chosen outscores rejected (Bradley-Terry)."""

    def __init__(self, spec: RLHFJobSpec, pad_id: int, reference: str | None = None):
        self.trainer: TrainerSpec = spec.actor
        self.pad_id = pad_id

    def build_model(self, path: str, pad_id: int) -> torch.nn.Module:
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = pad_id  # the head scores the last non-pad token
        module: torch.nn.Module = model
        return module

    def _scores(self, model: torch.nn.Module, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        seqs = [e.chosen for e in examples] + [e.rejected for e in examples if e.rejected is not None]
        scores = forward_logits(model, sequence_batch(seqs, self.pad_id))[:, 0].float()
        return scores[: len(examples)], scores[len(examples) :]

    def loss(
        self, model: torch.nn.Module, examples: list[Example], device: torch.device
    ) -> tuple[torch.Tensor, Metrics]:
        chosen, rejected = self._scores(model, examples)
        margins = [e.margin for e in examples]
        margin = (
            None
            if all(m is None for m in margins)
            else torch.tensor([m or 0.0 for m in margins], dtype=chosen.dtype, device=chosen.device)
        )
        loss = pairwise_loss(chosen, rejected, margin)
        return loss, {
            "loss": float(loss.detach()),
            "accuracy": float((chosen > rejected).float().mean()),
            "reward_margin": float((chosen - rejected).mean().detach()),
        }

    def evaluate(self, model: torch.nn.Module, examples: list[Example], device: torch.device) -> Metrics:
        chosen, rejected = self._scores(model, examples)
        return {
            "count": float(len(examples)),
            "eval_loss": float(pairwise_loss(chosen, rejected)) * len(examples),
            "eval_accuracy": float((chosen > rejected).float().sum()),
            "eval_reward_margin": float((chosen - rejected).sum()),
        }


class DPOObjective:
    """DPO / IPO / cDPO against a frozen reference held beside the policy on the same rank; its
    log-probs are computed per micro-batch, under no_grad."""

    def __init__(self, spec: RLHFJobSpec, pad_id: int, reference: str | None = None):
        self.trainer: TrainerSpec = spec.actor
        self.pad_id = pad_id
        self.dpo = spec.dpo or DPOSpec()
        self.reference_path = reference
        self.reference: torch.nn.Module | None = None

    def build_model(self, path: str, pad_id: int) -> torch.nn.Module:
        self.reference_path = self.reference_path or path
        return _causal_lm(path)

    def _frozen_reference(self, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        """The reference, loaded on first use: after the policy's sharded build, so it is a whole
        model on this rank (a ZeRO-3 inference engine for references too big for one GPU is not
        built yet)."""
        if self.reference is None:
            if self.reference_path is None:
                raise RuntimeError("the dpo objective computes losses only after build_model")
            # In the policy's compute dtype (spec.precision), so both sides of the margin round alike.
            reference = _causal_lm(self.reference_path).to(device, dtype)
            reference.eval().requires_grad_(False)
            self.reference = reference
        return self.reference

    def _rewards(
        self, model: torch.nn.Module, examples: list[Example], device: torch.device
    ) -> tuple[torch.Tensor, ...]:
        reference = self._frozen_reference(device, next(iter(model.parameters())).dtype)
        n = len(examples)
        batch = sequence_batch(
            [e.chosen for e in examples] + [e.rejected for e in examples if e.rejected], self.pad_id
        )
        policy = sequence_logprobs(model, batch, device)
        with torch.no_grad():
            ref = sequence_logprobs(reference, batch, device)
        d = self.dpo
        return dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], d.beta, d.label_smoothing, d.ipo)

    def loss(
        self, model: torch.nn.Module, examples: list[Example], device: torch.device
    ) -> tuple[torch.Tensor, Metrics]:
        loss, chosen, rejected = self._rewards(model, examples, device)
        return loss, {
            "loss": float(loss.detach()),
            "reward_accuracy": float((chosen > rejected).float().mean()),
            "reward_margin": float((chosen - rejected).mean()),
        }

    def evaluate(self, model: torch.nn.Module, examples: list[Example], device: torch.device) -> Metrics:
        loss, chosen, rejected = self._rewards(model, examples, device)
        return {
            "count": float(len(examples)),
            "eval_loss": float(loss) * len(examples),
            "eval_reward_accuracy": float((chosen > rejected).float().sum()),
            "eval_reward_margin": float((chosen - rejected).sum()),
        }


OFFLINE_OBJECTIVES: dict[str, Callable[[RLHFJobSpec, int, str | None], OfflineObjective]] = {
    "sft": SFTObjective,
    "rm": RewardModelObjective,
    "dpo": DPOObjective,
}


def batch_size(spec: RLHFJobSpec) -> int:
    """Records per optimizer step: actor.globalBatchSize, else one micro-batch per rank."""
    return spec.actor.global_batch_size or spec.actor.micro_batch_size * spec.actor.world_size


def combine(parts: list[Metrics]) -> Metrics:
    """Evaluation sums of every rank → means."""
    count = sum(p.get("count", 0.0) for p in parts)
    keys = {k for p in parts for k in p} - {"count"}
    return {k: sum(p.get(k, 0.0) for p in parts) / count for k in keys} if count else {}


def _mean(items: list[Metrics]) -> Metrics:
    keys = {k for m in items for k in m}
    return {k: sum(m[k] for m in items if k in m) / sum(1 for m in items if k in m) for k in keys}


class OfflineTrainerWorker:
    """One DeepSpeed rank of an offline run: its objective from OFFLINE_OBJECTIVES."""

    def __init__(
        self,
        spec: RLHFJobSpec,
        model: ModelRef,
        tokenizer: ModelRef,
        reference: ModelRef | None,
        rank: int,
        gpus: float,
        threads: int,
        pad_id: int,
    ):
        if threads:
            torch.set_num_threads(threads)
        self.spec = spec
        self.model_path, self.tokenizer_path = local_model(model), local_model(tokenizer)
        ref_path = local_model(reference) if reference is not None else None
        self.pad_id = pad_id
        self.objective = OFFLINE_OBJECTIVES[spec.algorithm](spec, pad_id, ref_path)
        layout = train_layout(batch_size(spec), spec.actor, "actor")
        self.rank = DeepSpeedRank("actor", spec.actor, layout, rank, pick_device(gpus), spec.precision)

    def ready(self) -> bool:
        return True

    def master_address(self) -> tuple[str, int]:
        return free_address()

    def init_world(self, master: tuple[str, int]) -> None:
        build = functools.partial(self.objective.build_model, self.model_path, self.pad_id)
        timeout = self.spec.schedule.step_timeout_seconds
        self.rank.join(master, with_lora(build, self.spec.actor.lora), timeout, self.spec.seed)

    def train(self, examples: list[Example]) -> Metrics:
        """One optimizer step over this rank's shard of `examples`; rank 0 returns the metrics."""
        layout, model, device = self.rank.layout, self.rank.model, self.rank.device
        mine = examples[shard(len(examples), self.rank.rank, layout.world)]
        parts = []
        for start in range(0, len(mine), layout.micro):
            loss, metrics = self.objective.loss(model, mine[start : start + layout.micro], device)
            model.backward(loss)
            model.step()
            parts.append(metrics)
        if self.rank.rank != 0:
            return {}
        out = _mean(parts)
        grad_norm = model.get_global_grad_norm()
        if grad_norm is not None:
            out["grad_norm"] = float(grad_norm)
        return out

    def evaluate(self, examples: list[Example]) -> Metrics:
        """Sums over this rank's shard of `examples` (every rank is called: ZeRO-3 gathers)."""
        model, device = self.rank.model, self.rank.device
        world, micro = self.rank.layout.world, self.rank.layout.micro
        mine = examples[shard(len(examples), self.rank.rank, world)]
        # Every rank runs as many forwards as the largest shard needs (ZeRO-3 gathers parameters in
        # each one); a rank out of records repeats one and does not count it.
        largest_shard = -(-len(examples) // world)
        forwards = -(-largest_shard // micro)
        parts: list[Metrics] = []
        model.eval()
        with torch.no_grad():
            for i in range(forwards):
                chunk = mine[i * micro : (i + 1) * micro]
                result = self.objective.evaluate(model, chunk or examples[:1], device)
                if chunk:
                    parts.append(result)
        model.train()
        keys = {k for p in parts for k in p}
        return {k: sum(p.get(k, 0.0) for p in parts) for k in keys}

    def save(self, directory: str, hf_dir: str | None) -> None:
        self.rank.save(directory, hf_dir, self.tokenizer_path)

    def load(self, directory: str) -> None:
        self.rank.load(directory)

    def export(self, hf_dir: str) -> None:
        """The trained model as a from_pretrained folder with its tokenizer (every rank calls it)."""
        self.rank.export(hf_dir, self.tokenizer_path)
