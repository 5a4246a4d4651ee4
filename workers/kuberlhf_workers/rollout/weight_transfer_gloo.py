"""A gloo backend for vLLM's weight-transfer API, so CPU engines are fed through the same API as GPU ones.

vLLM's own backends need CUDA (NCCL, CUDA IPC). This one joins a torch gloo group of its own with
trainer rank 0 (`base.transports.CollectiveTransport` is the sender, unchanged) and receives the
shared bucket plan's flat buffers, each bucket in one broadcast. vLLM's factory creates it inside
each worker once our worker extension registered it (`rollout.vllm_extension`); this module is
imported only there, by vLLM.

Two things differ from vLLM's NCCL engine, both because the weights are loaded layer by layer
(`start_weight_update` .. `finish_weight_update`): vLLM keeps each received tensor by reference
until its layer is complete, possibly several buckets later, so every bucket arrives in a fresh
buffer (reusing one would overwrite tensors still waiting); and the base class's `update_weights`
ends with `torch.accelerator.synchronize()`, which raises where there is no accelerator.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from kuberlhf_workers.base.engine_transports import GlooInit, GlooUpdate
from kuberlhf_workers.base.transports import bucket_nbytes, split_bucket

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.config.weight_transfer import WeightTransferConfig


@dataclass
class GlooInitInfo(GlooInit, WeightTransferInitInfo):
    pass


@dataclass
class GlooUpdateInfo(GlooUpdate, WeightTransferUpdateInfo):
    pass


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
    """One vLLM worker's member of the sync group; receives full HF-named tensors in buckets."""

    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo

    def __init__(
        self,
        config: WeightTransferConfig,
        vllm_config: VllmConfig,
        device: torch.device,
        model: torch.nn.Module,
    ) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group: Any = None
        self.buckets_received = 0  # over the engine's life, for logs and checks

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        """Join (or, after an engine of the group was replaced, rejoin) the sync group."""
        import torch.distributed as dist

        self.shutdown()
        parallel = self.parallel_config
        # As vLLM's NCCL engine ranks its workers: data-parallel replicas, then TP x PP workers.
        worker = parallel.data_parallel_index * parallel.world_size + parallel.rank
        timeout = timedelta(seconds=init_info.timeout_s)
        store = dist.TCPStore(  # type: ignore[attr-defined]  # exported at run time, not in the stubs
            init_info.host, init_info.port, init_info.world_size, False, timeout=timeout
        )
        rank = init_info.rank_offset + worker
        self.group = dist.ProcessGroupGloo(store, rank, init_info.world_size, timeout)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self.receive_weights(self.parse_update_info(update_info))
        if torch.accelerator.is_available():  # the weights were copied onto it asynchronously
            torch.accelerator.synchronize()

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        """Every bucket of the plan, in order; bucket k+1 is on the wire while bucket k loads."""
        if self.group is None:
            raise RuntimeError("gloo weight transfer not initialized: init_weight_transfer_engine first")
        from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check

        plan = update_info.plan()

        def post(k: int) -> tuple[torch.Tensor, Any]:
            flat = torch.empty(bucket_nbytes(plan[k]), dtype=torch.uint8).view(plan[k][0].torch_dtype)
            return flat, self.group.broadcast(flat, 0)

        upcoming = post(0) if plan else None
        with disable_mtp_completeness_check():
            for k, bucket in enumerate(plan):
                assert upcoming is not None
                flat, work = upcoming
                work.wait()
                upcoming = post(k + 1) if k + 1 < len(plan) else None
                self.model.load_weights(list(split_bucket(flat, bucket)))  # type: ignore[operator]
                self.buckets_received += 1

    def shutdown(self) -> None:
        self.group = None  # a gloo group closes when its last reference goes
