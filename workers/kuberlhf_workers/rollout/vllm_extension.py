"""The worker extension vLLM mixes into each of its workers, so weights load where they live.

vLLM reaches these methods with `collective_rpc`. Weights arrive as full HF-named tensors,
handed over by the rollout actor after its weight transport received them (one weight path for
every transport). They load through `reload_weights(..., is_checkpoint_format=True)`: on the CPU
backend vLLM repacks linear weights after loading, so `model.load_weights` alone would leave
the engine on the old weights; the layer-wise reload path redoes that processing. Nothing here
imports vLLM: the methods run inside vLLM's workers, which have it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


class WeightSyncExtension:
    """Mixed into vLLM's worker class; `self` is a vLLM worker (`reload_weights`, `model_runner`)."""

    def kuberlhf_load_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        self._reload(iter(named_tensors))
        return len(named_tensors)

    def kuberlhf_named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """Parameters that still hold plain tensors (the CPU backend repacks linear weights away)."""
        worker: Any = self
        model = worker.model_runner.model
        return [(name, p.detach().cpu().clone()) for name, p in model.named_parameters() if p.numel()]

    def _reload(self, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
        worker: Any = self
        worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
