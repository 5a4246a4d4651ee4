"""The frozen reference policy: log-probs of the rollout's tokens, for the KL term."""

from __future__ import annotations

from typing import Any

import torch

from kuberlhf_workers.base.models import ModelRef, local_model, pick_device
from kuberlhf_workers.base.samples import merge_results
from kuberlhf_workers.training.batch import collate, shard, token_logprobs
from kuberlhf_workers.training.forward import forward_logits


class ReferenceWorker:
    """Log-probs for its share of rows in one batched forward (a Ray actor)."""

    def __init__(self, model: ModelRef, gpus: float, threads: int, pad_id: int, temperature: float):
        from transformers import AutoModelForCausalLM

        if threads:
            torch.set_num_threads(threads)
        device = pick_device(gpus)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        path = local_model(model)
        loaded = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        self.model = loaded.to(device).eval()  # type: ignore[arg-type]  # transformers types `.to` oddly
        self.pad_id = pad_id
        self.temperature = temperature

    def ready(self) -> bool:
        return True

    def logprobs(self, rollout_refs: list[Any], rank: int, world: int) -> torch.Tensor:
        import ray

        batch = collate(merge_results(ray.get(rollout_refs)), self.pad_id)
        mine = batch.rows(shard(len(batch), rank, world))
        with torch.inference_mode():
            return token_logprobs(forward_logits(self.model, mine), mine, self.temperature).cpu()
