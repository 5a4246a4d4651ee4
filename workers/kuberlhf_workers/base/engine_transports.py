"""Weight sync into vLLM engines through vLLM's own weight-transfer API.

With `rollout.engine: vllm` the receiving end of a sync is not the rollout actor but each of the
engine's vLLM workers, through `vllm.distributed.weight_transfer`: the engine is started with a
weight-transfer backend, the rollout actor calls `init_weight_transfer_engine` once per sync group
and `start_weight_update` / `update_weights` / `finish_weight_update` per sync, and the backend's
engine inside each worker receives the tensors and loads them layer by layer (vLLM redoes its
kernel repacking as each layer completes, which a bare `load_weights` would not). Backends:

- `kuberlhf_gloo` (CPU, and GPU engines that share a trainer's GPU or run tensor-parallel): ours,
  `rollout.weight_transfer_gloo`, registered in vLLM's `WeightTransferEngineFactory` when vLLM
  imports our worker extension. Its wire is `CollectiveTransport`'s (one flat broadcast per bucket
  of the shared plan), so trainer rank 0 sends with that transport unchanged.
- `nccl` (trainer GPU to engine GPUs): vLLM's own engine; trainer rank 0 speaks its packed wire
  with vLLM's own producer (`VLLMNcclSender`), which alone fixes where its chunks end.

The choice is made here once: `engine_backend` (what the engine is started with) and
`transport_kind` (what the driver builds) read the same table. The hf engine and the
object-store transport keep the rollout actor as the receiver (`base.transports`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from kuberlhf.api import RLHFJobSpec, WeightTransportName
from kuberlhf.engine_choice import resolved_engine
from kuberlhf.placement import weight_sync_transport
from kuberlhf_workers.base.transports import (
    TRANSPORTS,
    CollectiveTransport,
    ParamMeta,
    TransportKind,
    Transports,
    WeightSink,
    WeightTransport,
    bucket_nbytes,
)

GLOO_BACKEND = "kuberlhf_gloo"
# The vLLM weight-transfer backend serving each of our transports (object-store has none).
ENGINE_BACKENDS: dict[WeightTransportName, str] = {"gloo": GLOO_BACKEND, "nccl": "nccl"}
# Module and class vLLM's factory imports for our backend, inside its own processes.
GLOO_ENGINE = ("kuberlhf_workers.rollout.weight_transfer_gloo", "GlooWeightTransferEngine")


@dataclass
class GlooInit:
    """What a vLLM worker needs to join the sync group: the rendezvous of trainer rank 0, its engine's
    first rank (an engine of T tensor-parallel workers takes T consecutive ranks) and the group size."""

    host: str
    port: int
    rank_offset: int
    world_size: int
    timeout_s: float


@dataclass
class GlooUpdate:
    """One sync's bucket plan as plain data: per bucket, [name, dtype, shape] of each parameter."""

    buckets: list[list[tuple[str, str, list[int]]]] = field(default_factory=list)

    @staticmethod
    def of(plan: list[list[ParamMeta]]) -> GlooUpdate:
        return GlooUpdate([[(m.name, m.dtype, list(m.shape)) for m in bucket] for bucket in plan])

    def plan(self) -> list[list[ParamMeta]]:
        return [[ParamMeta(name, tuple(shape), dtype) for name, dtype, shape in b] for b in self.buckets]


@runtime_checkable
class WeightTransferClient(Protocol):
    """An engine that receives through vLLM's weight-transfer API (the vLLM rollout backend)."""

    def init_weight_transfer(self, init_info: dict[str, Any]) -> None:
        """Join the sync group from inside the engine's workers (blocks until every member joined)."""
        ...

    def transfer_weights(self, update_info: dict[str, Any]) -> None:
        """One whole sync: start, receive every bucket, finish."""
        ...


def _client(engine: WeightSink | None) -> WeightTransferClient:
    if not isinstance(engine, WeightTransferClient):
        raise TypeError(
            f"this weight-sync receiver feeds vLLM's weight-transfer API; {type(engine).__name__} has "
            "none (only rollout.engine: vllm receives this way)"
        )
    return engine


@dataclass
class EngineReceiver:
    """The rollout actor's end: drives the engine's weight-transfer control plane, while the tensors
    go straight into the engine's workers. Picklable: the driver builds one per engine."""

    receivers_wait_for_sender: ClassVar[bool] = False
    init_info: dict[str, Any]
    update_info: dict[str, Any]

    def connect(self, engine: WeightSink | None = None) -> None:
        _client(engine).init_weight_transfer(self.init_info)

    def send(self, buckets: Any) -> None:
        raise TypeError("an engine receiver only receives; trainer rank 0 sends")

    def receive(self, payload: Any, engine: WeightSink) -> None:
        _client(engine).transfer_weights(self.update_info)


def _own_copy(item: tuple[str, torch.Tensor]) -> torch.Tensor:
    """vLLM's producer keeps tensors until their chunk is full, which can be after the next bucket
    was gathered and this one re-partitioned (ZeRO-3): it packs a copy instead."""
    return item[1].detach().clone(memory_format=torch.contiguous_format)


@dataclass
class VLLMNcclSender:
    """Trainer rank 0 on vLLM's NCCL weight-transfer wire (rank 0 of a vLLM `StatelessProcessGroup`).

    vLLM's consumer cuts its chunks from the parameter list and `chunk_bytes`; only vLLM's producer
    is guaranteed to cut them the same way, so it sends, fed from the plan's buckets in order."""

    receivers_wait_for_sender: ClassVar[bool] = False
    host: str
    port: int
    world_size: int
    chunk_bytes: int
    _group: Any = None

    def connect(self, engine: WeightSink | None = None) -> None:
        from vllm.distributed.weight_transfer.nccl_common import trainer_init

        self._group = trainer_init(
            {"master_address": self.host, "master_port": self.port, "world_size": self.world_size}
        )

    def send(self, buckets: Any) -> None:
        from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

        pairs = ((name, tensor) for bucket in buckets for name, tensor in bucket)
        packed_nccl_broadcast_producer(
            iterator=pairs,
            group=self._group,
            src=0,
            post_iter_func=_own_copy,
            buffer_size_bytes=self.chunk_bytes,
            num_buffers=2,
        )

    def receive(self, payload: Any, engine: WeightSink) -> None:
        raise TypeError("trainer rank 0 only sends")


def _engine_gloo(
    workers: int, address: tuple[str, int], engines: int, plan: list[list[ParamMeta]], timeout_s: float
) -> Transports:
    host, port = address
    world = 1 + engines * workers
    sender = CollectiveTransport(host, port, 0, world, "gloo", plan, timeout_s)
    update = asdict(GlooUpdate.of(plan))
    receivers: list[WeightTransport] = [
        EngineReceiver(asdict(GlooInit(host, port, 1 + i * workers, world, timeout_s)), update)
        for i in range(engines)
    ]
    return sender, receivers


def _engine_nccl(
    workers: int, address: tuple[str, int], engines: int, plan: list[list[ParamMeta]], timeout_s: float
) -> Transports:
    host, port = address
    world = 1 + engines * workers
    chunk = max((bucket_nbytes(bucket) for bucket in plan), default=1)
    metas = [m for bucket in plan for m in bucket]
    update = {
        "names": [m.name for m in metas],
        "dtype_names": [m.dtype for m in metas],
        "shapes": [list(m.shape) for m in metas],
    }
    wire = {"packed": True, "packed_buffer_size_bytes": chunk, "packed_num_buffers": 2}
    receivers: list[WeightTransport] = []
    for i in range(engines):
        rendezvous = {"master_address": host, "master_port": port, "world_size": world}
        receivers.append(EngineReceiver({**rendezvous, "rank_offset": 1 + i * workers, **wire}, update))
    return VLLMNcclSender(host, port, world, chunk), receivers


ENGINE_MAKERS = {GLOO_BACKEND: _engine_gloo, "nccl": _engine_nccl}


def engine_backend(spec: RLHFJobSpec) -> str | None:
    """The vLLM weight-transfer backend the engines receive through, or None where the rollout actor
    receives (the hf engine; the object-store transport)."""
    if resolved_engine(spec) != "vllm":
        return None
    return ENGINE_BACKENDS.get(weight_sync_transport(spec))


def transport_kind(spec: RLHFJobSpec) -> TransportKind:
    """How this spec's weight sync is built: the one place that picks its path."""
    backend = engine_backend(spec)
    if backend is None:
        return TRANSPORTS[weight_sync_transport(spec)]
    return TransportKind(partial(ENGINE_MAKERS[backend], spec.rollout.tensor_parallel_size), rendezvous=True)

