"""The worker extension vLLM mixes into each of its workers, so weights load where they live.

Importing this module registers our gloo backend (`rollout.weight_transfer_gloo`) in vLLM's
weight-transfer factory. vLLM imports the extension in every process that builds a worker (the
in-process engine, each Ray TP worker) before it loads the model and creates the worker's
weight-transfer engine, so the backend is known wherever it is needed, with no package entry
point to install.

Where the rollout actor receives (the object-store transport), vLLM reaches `kuberlhf_load_weights`
with `collective_rpc`: full HF-named tensors loaded through `reload_weights(...,
is_checkpoint_format=True)`. On the CPU backend vLLM repacks linear weights after loading, so
`model.load_weights` alone would leave the engine on the old weights; the layer-wise reload path
redoes that processing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from kuberlhf_workers.base.engine_transports import GLOO_BACKEND, GLOO_ENGINE


def register_weight_transfer_engines() -> None:
    """Our backends in vLLM's registry (lazily: the engine module loads only when one is created)."""
    from vllm.distributed.weight_transfer import WeightTransferEngineFactory

    with contextlib.suppress(ValueError):  # registered already (the module was reloaded)
        WeightTransferEngineFactory.register_engine(GLOO_BACKEND, *GLOO_ENGINE)


register_weight_transfer_engines()


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
