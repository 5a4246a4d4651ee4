"""The frozen reference policy: log-probs of the rollout's tokens, for the KL term, computed in
micro-batches the size of the actor's (the fp32 logits of a whole share would not fit a GPU), laid
out as the actor's are (spec.actor.padding: training.padding).

A reference that fits one GPU is a whole model in every worker (`reference.zeroStage: 0`). One that
does not (a 72B reference is 144 GB in bf16) is sharded over the reference workers with DeepSpeed
ZeRO-3 (`zeroStage: 3`): the workers form a world of their own, the model is built inside
`zero.Init` so no worker ever holds all of it, and each forward gathers one layer at a time. Those
gathers are collective, so every worker runs the same number of forwards, padding a short share
with a repeated micro-batch whose output it drops, and lays every micro-batch out in one forward
(the bucket layout's forwards per micro-batch vary with its rows: it becomes pack there).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from kuberlhf.api import Padding, Precision
from kuberlhf_workers.base.models import ModelRef, local_model, pick_device
from kuberlhf_workers.base.precision import compute_dtype
from kuberlhf_workers.base.samples import merge_results, shard
from kuberlhf_workers.base.transports import free_address
from kuberlhf_workers.training import padding as layouts
from kuberlhf_workers.training.batch import collate, response_logprobs
from kuberlhf_workers.training.layout import inference_config
from kuberlhf_workers.training.rank import join_world


class ReferenceWorker:
    """Log-probs for its share of rows in one batched forward (a Ray actor): rank `rank` of the
    `world` reference workers."""

    def __init__(
        self,
        model: ModelRef,
        gpus: float,
        threads: int,
        pad_id: int,
        temperature: float,
        micro_batch: int,
        precision: Precision = "auto",
        zero_stage: int = 0,
        rank: int = 0,
        world: int = 1,
        padding: Padding = "auto",
    ):
        if threads:
            torch.set_num_threads(threads)
        self.device = pick_device(gpus)
        # The actor's compute dtype: a bf16 actor against an fp32 reference would read its rounding
        # as KL divergence.
        self.dtype = compute_dtype(precision, self.device)
        self.path = local_model(model)
        self.pad_id = pad_id
        self.temperature = temperature
        self.micro_batch = micro_batch  # rows per forward: the logits of a whole share would not fit
        self.sharded, self.rank, self.world = zero_stage == 3, rank, world
        self.layout = layouts.resolve(padding, self.device, self.dtype)
        if self.sharded and self.layout == "bucket":  # ZeRO-3 gathers: the same forwards on every worker
            self.layout = "pack"
        self._model: torch.nn.Module | None = None
        if not self.sharded:
            self._model = self._load().to(self.device).eval()

    def _load(self) -> Any:
        from transformers import AutoModelForCausalLM

        kernel = layouts.attention_implementation(self.layout)
        extra = {} if kernel is None else {"attn_implementation": kernel}
        return AutoModelForCausalLM.from_pretrained(self.path, dtype=self.dtype, **extra)

    def ready(self) -> bool:
        return True

    def master_address(self) -> tuple[str, int]:
        return free_address()

    def init_world(self, master: tuple[str, int], timeout_s: float) -> None:
        """Join the reference world and build the model sharded in it (zeroStage 3); all workers
        call this concurrently."""
        import deepspeed
        from transformers import AutoConfig
        from transformers.integrations.deepspeed import HfDeepSpeedConfig

        join_world(master, self.rank, self.world, timeout_s)
        hidden = getattr(AutoConfig.from_pretrained(self.path), "hidden_size", None)
        config = inference_config(self.micro_batch, hidden, bf16=self.dtype == torch.bfloat16)
        sharded = HfDeepSpeedConfig(config)  # from_pretrained builds under zero.Init while it lives
        engine, *_ = deepspeed.initialize(model=self._load(), config=config)
        del sharded
        self._model = engine.module.eval()

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            raise RuntimeError(f"reference {self.rank} used before joining its ZeRO-3 world")
        return self._model

    def logprobs(self, rollout_refs: list[Any], rank: int, world: int) -> torch.Tensor:
        import ray

        batch = collate(merge_results(ray.get(rollout_refs)), self.pad_id)
        mine = shard(len(batch), rank, world)
        micro = self.micro_batch
        slices = [slice(s, min(s + micro, mine.stop)) for s in range(mine.start, mine.stop, micro)]
        drop = 0
        if self.sharded:  # each layer is gathered with the others: as many forwards as the largest share
            drop = math.ceil(math.ceil(len(batch) / world) / self.micro_batch) - len(slices)
        parts = []
        with torch.no_grad():  # not inference_mode: ZeRO-3 re-partitions the gathered parameters after use
            for rows in [batch.rows(s) for s in slices] + [batch.rows(slice(0, 1))] * drop:
                scores = layouts.response_outputs(self.model, rows, self.layout)
                parts.append(response_logprobs(scores, rows, self.temperature).cpu())
        parts = parts[: len(slices)]
        return torch.cat(parts) if parts else torch.zeros((0, batch.response_mask.shape[1]))
