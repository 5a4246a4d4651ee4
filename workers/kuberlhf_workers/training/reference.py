"""The frozen reference policy: log-probs of the rollout's tokens, for the KL term, computed in
micro-batches the size of the actor's (the fp32 logits of a whole share would not fit a GPU)."""

from __future__ import annotations

from typing import Any

import torch

from kuberlhf.api import Precision
from kuberlhf_workers.base.models import ModelRef, local_model, pick_device
from kuberlhf_workers.base.precision import compute_dtype
from kuberlhf_workers.base.samples import merge_results, shard
from kuberlhf_workers.training.batch import collate, token_logprobs
from kuberlhf_workers.training.forward import forward_logits


class ReferenceWorker:
    """Log-probs for its share of rows in one batched forward (a Ray actor)."""

    def __init__(
        self,
        model: ModelRef,
        gpus: float,
        threads: int,
        pad_id: int,
        temperature: float,
        micro_batch: int,
        precision: Precision = "auto",
    ):
        from transformers import AutoModelForCausalLM

        if threads:
            torch.set_num_threads(threads)
        device = pick_device(gpus)
        # The actor's compute dtype: a bf16 actor against an fp32 reference would read its rounding
        # as KL divergence.
        path = local_model(model)
        loaded = AutoModelForCausalLM.from_pretrained(path, dtype=compute_dtype(precision, device))
        self.model = loaded.to(device).eval()  # type: ignore[arg-type]  # transformers types `.to` oddly
        self.pad_id = pad_id
        self.temperature = temperature
        self.micro_batch = micro_batch  # rows per forward: the logits of a whole share would not fit

    def ready(self) -> bool:
        return True

    def logprobs(self, rollout_refs: list[Any], rank: int, world: int) -> torch.Tensor:
        import ray

        batch = collate(merge_results(ray.get(rollout_refs)), self.pad_id)
        mine = shard(len(batch), rank, world)
        parts = []
        with torch.inference_mode():
            for start in range(mine.start, mine.stop, self.micro_batch):
                rows = batch.rows(slice(start, min(start + self.micro_batch, mine.stop)))
                parts.append(token_logprobs(forward_logits(self.model, rows), rows, self.temperature).cpu())
        return torch.cat(parts) if parts else torch.zeros((0, batch.response_mask.shape[1]))
