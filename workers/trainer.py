"""DeepSpeed trainers (the actor, and the critic for ppo) and the frozen reference model.

Every rank of a trainer group is one Ray actor; together they form one data-parallel
DeepSpeed world. Each rank pulls the rollout, rewards, reference log-probs and critic values
straight from the object store (never through the driver), computes the advantages for the
whole batch itself (cheap and deterministic, so all ranks agree), and trains on its shard.
Old log-probs are the rollout's behaviour log-probs: in synchronous training the rollout
weights are the trainer's, so no extra forward pass is needed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from kuberlhf.workers import algorithms
from kuberlhf.workers.batch import Batch, collate, merge_results, response_values, shard, token_logprobs
from kuberlhf.workers.rollout import ModelRef, local_model, pick_device
from kuberlhf.workers.weight_sync import ParamMeta, free_address, param_meta, plan_buckets

from kuberlhf.api import RLHFJobSpec, TrainerSpec


@dataclass(frozen=True)
class Layout:
    """How one rollout batch splits into ranks, optimizer steps and micro-batches."""

    rows: int
    world: int
    micro: int
    accumulation: int

    @property
    def global_batch(self) -> int:
        return self.micro * self.accumulation * self.world


def train_layout(rows: int, trainer: TrainerSpec, field: str) -> Layout:
    """Check the batch arithmetic up front, with the fix in the message, instead of hanging a rank."""
    world = trainer.replicas
    if rows % world:
        raise ValueError(
            f"spec.{field}.replicas: {world} ranks cannot split a rollout batch of {rows} "
            "(promptsPerStep * samplesPerPrompt) evenly; pick a divisor"
        )
    global_batch = trainer.global_batch_size or rows
    if rows % global_batch:
        raise ValueError(f"spec.{field}.globalBatchSize: {global_batch} must divide the rollout batch {rows}")
    micro = min(trainer.micro_batch_size, global_batch // world)
    if (global_batch // world) % micro:
        raise ValueError(
            f"spec.{field}.microBatchSize: {micro} must divide the per-rank batch {global_batch // world}"
        )
    return Layout(rows, world, micro, global_batch // world // micro)


def deepspeed_config(trainer: TrainerSpec, layout: Layout, on_gpu: bool) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": trainer.zero_stage}
    if trainer.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    return {
        "train_batch_size": layout.global_batch,
        "train_micro_batch_size_per_gpu": layout.micro,
        "gradient_accumulation_steps": layout.accumulation,
        "gradient_clipping": trainer.max_grad_norm,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": trainer.learning_rate, "weight_decay": 0.0, "torch_adam": True},
        },
        "zero_force_ds_cpu_optimizer": False,
        "zero_optimization": zero,
        "bf16": {"enabled": on_gpu},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


@dataclass
class Experience:
    """Everything a trainer rank needs for one update, for the whole batch."""

    batch: Batch
    rewards: torch.Tensor
    kl: torch.Tensor
    ref_logp: torch.Tensor | None
    values: torch.Tensor | None
    advantages: torch.Tensor
    returns: torch.Tensor | None


def make_experience(
    spec: RLHFJobSpec,
    batch: Batch,
    rewards: torch.Tensor,
    ref_logp: torch.Tensor | None,
    values: torch.Tensor | None,
) -> Experience:
    mask = batch.response_mask
    if ref_logp is not None:
        kl = algorithms.kl_estimate(batch.behaviour_logp, ref_logp, spec.kl.estimator) * mask
    else:
        kl = torch.zeros_like(mask)
    advantages, returns = algorithms.compute_advantages(
        spec.algorithm,
        rewards,
        mask,
        spec.rollout.samples_per_prompt,
        kl=kl,
        kl_coef=spec.kl.coef,
        kl_mode=spec.kl.mode,
        values=values,
        gamma=spec.loss.gamma,
        lam=spec.loss.lambd,
    )
    return Experience(batch, rewards, kl, ref_logp, values, advantages, returns)


def _forward(model: Any, batch: Batch) -> torch.Tensor:
    device = next(iter(model.parameters())).device
    out = model(
        input_ids=batch.input_ids.to(device),
        attention_mask=batch.attention_mask.to(device),
        position_ids=batch.position_ids.to(device),
        use_cache=False,
    )
    return out.logits


def _mean_metrics(items: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for m in items for k in m}
    return {k: sum(float(m[k]) for m in items if k in m) / sum(1 for m in items if k in m) for k in keys}


class ReferenceWorker:
    """The frozen reference policy: log-probs for its share of rows in one batched forward."""

    def __init__(self, model: ModelRef, gpus: float, threads: int, pad_id: int, temperature: float):
        from transformers import AutoModelForCausalLM

        if threads:
            torch.set_num_threads(threads)
        device = pick_device(gpus)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        path = local_model(model)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        self.pad_id = pad_id
        self.temperature = temperature

    def ready(self) -> bool:
        return True

    def logprobs(self, rollout_refs: list[Any], rank: int, world: int) -> torch.Tensor:
        import ray

        batch = collate(merge_results(ray.get(rollout_refs)), self.pad_id)
        mine = batch.rows(shard(len(batch), rank, world))
        with torch.inference_mode():
            return token_logprobs(_forward(self.model, mine), mine, self.temperature).cpu()


class TrainerWorker:
    """One DeepSpeed rank of the actor (causal LM) or the critic (LM with a 1-unit value head)."""

    def __init__(
        self,
        role: str,
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
        self.role, self.spec, self.rank = role, spec, rank
        self.model_path, self.tokenizer_path = local_model(model), local_model(tokenizer)
        self.pad_id = pad_id
        self.trainer = spec.actor if role == "actor" else (spec.critic or spec.actor)
        self.device = pick_device(gpus)
        self.layout = train_layout(
            spec.rollout.prompts_per_step * spec.rollout.samples_per_prompt, self.trainer, role
        )
        self.engine: Any = None
        self.sender: Any = None

    def master_address(self) -> tuple[str, int]:
        return free_address()

    def init_world(self, master: tuple[str, int]) -> None:
        """Join the data-parallel world; all ranks must call this concurrently."""
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

        os.environ.update(
            MASTER_ADDR=master[0],
            MASTER_PORT=str(master[1]),
            RANK=str(self.rank),
            WORLD_SIZE=str(self.layout.world),
            LOCAL_RANK="0",  # Ray gives each rank its own device
        )
        if self.role == "actor":
            model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32)
        else:
            model = AutoModelForTokenClassification.from_pretrained(
                self.model_path, num_labels=1, dtype=torch.float32
            )
            model.config.pad_token_id = self.pad_id
        if self.trainer.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        # As deepspeed.initialize would, but with the step deadline instead of torch's 30 minutes:
        # a rank stuck in a collective fails with the others instead of holding the job.
        deepspeed.init_distributed(
            get_accelerator().communication_backend_name(),
            verbose=False,
            timeout=timedelta(seconds=self.spec.schedule.step_timeout_seconds),
        )
        config = deepspeed_config(self.trainer, self.layout, self.device.type == "cuda")
        self.engine, *_ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=config
        )

    @property
    def zero3(self) -> bool:
        return self.trainer.zero_stage == 3

    def _gathered(self, params: list[torch.nn.Parameter]) -> Any:
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=self.zero3)

    # -- experience -------------------------------------------------------------------------------

    def _experience(
        self, rollout_refs: list[Any], rewards: list[float], ref_refs: list[Any], value_refs: list[Any]
    ) -> Experience:
        import ray

        batch = collate(merge_results(ray.get(rollout_refs)), self.pad_id)
        reward_tensor = torch.as_tensor(rewards, dtype=torch.float32)
        ref_logp = torch.cat(ray.get(ref_refs)) if ref_refs else None
        values = torch.cat(ray.get(value_refs)) if value_refs else None
        return make_experience(self.spec, batch, reward_tensor, ref_logp, values)

    def values(self, rollout_refs: list[Any]) -> torch.Tensor:
        """Critic values of this rank's rows (every critic rank is called, as ZeRO-3 needs)."""
        import ray

        batch = collate(merge_results(ray.get(rollout_refs)), self.pad_id)
        mine = batch.rows(shard(len(batch), self.rank, self.layout.world))
        self.engine.eval()
        with torch.no_grad():
            values = response_values(_forward(self.engine, mine).squeeze(-1), mine)
        self.engine.train()
        return values.cpu() * mine.response_mask

    # -- training ---------------------------------------------------------------------------------

    def train(
        self, rollout_refs: list[Any], rewards: list[float], ref_refs: list[Any], value_refs: list[Any]
    ) -> dict[str, float]:
        exp = self._experience(rollout_refs, rewards, ref_refs, value_refs)
        mine = shard(len(exp.batch), self.rank, self.layout.world)
        step_metrics = []
        for _ in range(self.trainer.epochs):
            for start in range(mine.start, mine.stop, self.layout.micro):
                rows = slice(start, min(start + self.layout.micro, mine.stop))
                loss, metrics = (self._policy_loss if self.role == "actor" else self._value_loss)(exp, rows)
                self.engine.backward(loss)
                self.engine.step()
                step_metrics.append(metrics)
        if self.rank != 0:
            return {}
        out = _mean_metrics(step_metrics)
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            out[f"{self.role}_grad_norm"] = float(grad_norm)
        if self.role == "actor":
            out.update(_batch_metrics(exp))
        return out

    def _policy_loss(self, exp: Experience, rows: slice) -> tuple[torch.Tensor, dict[str, float]]:
        mb = exp.batch.rows(rows)
        mask = mb.response_mask.to(self.device)
        logp = token_logprobs(_forward(self.engine, mb), mb, self.spec.rollout.temperature)
        loss_spec = self.spec.loss
        loss, metrics = algorithms.policy_loss(
            logp,
            mb.behaviour_logp.to(self.device),
            exp.advantages[rows].to(self.device),
            mask,
            loss_spec.clip_range,
            loss_spec.clip_range_high or loss_spec.clip_range,
            algorithms.loss_aggregation(self.spec.algorithm),
            norm_len=self.spec.data.max_new_tokens,
        )
        if exp.ref_logp is not None and self.spec.kl.mode == "loss":
            kl_term = algorithms.kl_loss(
                logp, exp.ref_logp[rows].to(self.device), mask, self.spec.kl.estimator
            )
            loss = loss + self.spec.kl.coef * kl_term
        return loss, {k: float(v) for k, v in metrics.items()} | {"policy_loss": float(loss.detach())}

    def _value_loss(self, exp: Experience, rows: slice) -> tuple[torch.Tensor, dict[str, float]]:
        mb = exp.batch.rows(rows)
        assert exp.returns is not None and exp.values is not None, "ppo computes returns and values"
        values = response_values(_forward(self.engine, mb).squeeze(-1), mb)
        loss = algorithms.value_loss(
            values,
            exp.values[rows].to(self.device),
            exp.returns[rows].to(self.device),
            mb.response_mask.to(self.device),
            self.spec.loss.value_clip_range,
        )
        return loss, {"value_loss": float(loss.detach())}

    # -- weights out ------------------------------------------------------------------------------

    def param_meta(self) -> list[ParamMeta]:
        return [param_meta(n, p) for n, p in self.engine.module.named_parameters()]

    def sync_address(self) -> tuple[str, int]:
        return free_address()

    def join_weight_sync(self, sender: Any) -> None:
        sender.connect()
        self.sender = sender

    def _full_buckets(self, plan: list[list[ParamMeta]]) -> Any:
        named = dict(self.engine.module.named_parameters())
        for bucket in plan:
            params = [named[m.name] for m in bucket]
            with self._gathered(params):
                yield [(m.name, p.data) for m, p in zip(bucket, params, strict=True)]

    def send_weights(self) -> Any:
        """All ranks call this (ZeRO-3 gathers are collective); only rank 0 sends."""
        bucket_bytes = self.spec.weight_sync.bucket_m_b * 2**20
        buckets = self._full_buckets(plan_buckets(self.param_meta(), bucket_bytes))
        if self.rank == 0:
            return self.sender.send(buckets)
        for _ in buckets:
            pass
        return None

    def parameters(self) -> dict[str, torch.Tensor]:
        """Full parameters (gathered under ZeRO-3, so every rank must call it)."""
        out = {}
        for name, p in self.engine.module.named_parameters():
            with self._gathered([p]):
                out[name] = p.data.detach().float().cpu().clone()
        return out

    # -- checkpoints ------------------------------------------------------------------------------

    def save(self, directory: str, hf_dir: str | None) -> None:
        """DeepSpeed state (model, optimizer, scheduler) and RNG state on every rank; HF weights from
        rank 0 (the folder a user loads with from_pretrained)."""
        self.engine.save_checkpoint(directory, tag=self.role)
        rng = Path(self._rng_file(directory))
        rng.parent.mkdir(parents=True, exist_ok=True)
        torch.save(_rng_state(), rng)
        if hf_dir is None:
            return
        model = self.engine.module
        with self._gathered(list(model.parameters())):
            if self.rank == 0:
                state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                model.save_pretrained(hf_dir, state_dict=state, safe_serialization=True)
        if self.rank == 0:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(self.tokenizer_path).save_pretrained(hf_dir)

    def load(self, directory: str) -> None:
        path, _ = self.engine.load_checkpoint(directory, tag=self.role, load_optimizer_states=True)
        if path is None:
            raise FileNotFoundError(f"no {self.role} DeepSpeed checkpoint in {directory}")
        rng = Path(self._rng_file(directory))
        if rng.is_file():
            _set_rng_state(torch.load(rng, weights_only=False))

    def _rng_file(self, directory: str) -> str:
        return str(Path(directory) / self.role / f"rng-rank{self.rank}.pt")


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _batch_metrics(exp: Experience) -> dict[str, float]:
    mask = exp.batch.response_mask
    lengths = mask.sum(-1)
    kl_mean = float((exp.kl.sum(-1) / lengths.clamp(min=1)).mean())
    return {
        "reward_mean": float(exp.rewards.mean()),
        "reward_std": float(exp.rewards.std()) if len(exp.rewards) > 1 else 0.0,
        "kl": kl_mean,
        "response_length_mean": float(lengths.mean()),
        "advantage_mean": float(algorithms.masked_mean(exp.advantages, mask)),
    }
