"""Weight sync into vLLM: the worker extension (engine side) and the broadcast sender (trainer side).

vLLM mixes `worker_extension_cls` into every one of its workers, so the methods below run where
the engine's weights live and are reached with `collective_rpc`. Two ways in:

- direct: full tensors handed over as arguments (in-process engine on CPU, or through Ray);
- broadcast: a separate process group (NCCL on GPU, gloo on CPU) whose rank 0 is the trainer and
  whose other ranks are the vLLM workers; parameters travel in buckets of one flat byte buffer
  each, because one collective per parameter is the known bottleneck.

Both end in `reload_weights(..., is_checkpoint_format=True)`: on the CPU backend vLLM repacks linear
weights after loading, so `model.load_weights` alone leaves the engine on the old weights; the
layer-wise reload path redoes that processing. This module imports vLLM only inside the methods
that run in the engine, so the trainer can import the sender without vLLM.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

GROUP_PREFIX = "kuberlhf-weight-sync"


@dataclass(frozen=True)
class TensorMeta:
    """What a receiver must know to rebuild one tensor from a byte buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()


def tensor_meta(name: str, tensor: torch.Tensor) -> TensorMeta:
    return TensorMeta(name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))


def plan_buckets(metas: list[TensorMeta], bucket_bytes: int) -> list[list[TensorMeta]]:
    """Group tensors in order into buckets of at most `bucket_bytes` (a bigger tensor goes alone).

    Sender and receivers run this on the same metas, so they agree on every buffer's layout
    without exchanging it.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    buckets: list[list[TensorMeta]] = []
    current: list[TensorMeta] = []
    size = 0
    for meta in metas:
        if current and size + meta.nbytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(meta)
        size += meta.nbytes
    if current:
        buckets.append(current)
    return buckets


def pack_bucket(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors])


def unpack_bucket(buffer: torch.Tensor, bucket: list[TensorMeta]) -> Iterator[tuple[str, torch.Tensor]]:
    offset = 0
    for meta in bucket:
        chunk = buffer[offset : offset + meta.nbytes]
        yield meta.name, chunk.view(getattr(torch, meta.dtype)).view(meta.shape)
        offset += meta.nbytes


def new_group(
    master_address: str, master_port: int, rank: int, world_size: int, backend: str, timeout_s: float
) -> Any:
    """A process group outside torch.distributed's default one (the trainer already owns that).

    Rank 0 hosts the TCP store; every rank blocks here until all `world_size` ranks have joined,
    so the trainer and the engines must call this at the same time.
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(
        master_address, master_port, world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=False
    )
    prefixed = dist.PrefixStore(GROUP_PREFIX, store)
    if backend == "gloo":
        return dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
    raise ValueError(f"weight-sync backend must be 'nccl' or 'gloo', got {backend!r}")


def broadcast(group: Any, buffer: torch.Tensor) -> None:
    options = dist.BroadcastOptions()
    options.rootRank = 0
    group.broadcast([buffer], options).wait()


class WeightBroadcaster:
    """Trainer rank 0's end of the weight-sync group: rank 0 of 1 + every vLLM worker."""

    def __init__(
        self,
        master_address: str,
        master_port: int,
        world_size: int,
        backend: str = "nccl",
        timeout_s: float = 600.0,
        device: str | torch.device = "cpu",
    ):
        self.device = torch.device(device)
        self.group = new_group(master_address, master_port, 0, world_size, backend, timeout_s)

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> None:
        """Broadcast full tensors bucket by bucket (receivers were given `metas_of` the same list)."""
        tensors = dict(named_tensors)
        metas = [tensor_meta(name, t) for name, t in tensors.items()]
        for bucket in plan_buckets(metas, bucket_bytes):
            broadcast(self.group, pack_bucket([tensors[m.name].to(self.device) for m in bucket]))


def metas_of(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[TensorMeta]:
    return [tensor_meta(name, t) for name, t in named_tensors]


class WeightSyncExtension:
    """Mixed into vLLM's worker class; `self` is a vLLM worker (`reload_weights`, `rank`, `device`)."""

    weight_sync_group: Any = None

    def kuberlhf_load_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        self._reload(iter(named_tensors))
        return len(named_tensors)

    def kuberlhf_init_weight_sync(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        backend: str,
        timeout_s: float,
    ) -> int:
        worker: Any = self
        rank = rank_offset + int(worker.rank)
        self.weight_sync_group = new_group(master_address, master_port, rank, world_size, backend, timeout_s)
        return rank

    def kuberlhf_receive_weights(self, metas: list[TensorMeta], bucket_bytes: int) -> int:
        if self.weight_sync_group is None:
            raise RuntimeError("weight-sync group not initialised: call init_weight_sync first")
        group = self.weight_sync_group
        worker: Any = self
        device = worker.device

        def received() -> Iterator[tuple[str, torch.Tensor]]:
            for bucket in plan_buckets(metas, bucket_bytes):
                buffer = torch.empty(sum(m.nbytes for m in bucket), dtype=torch.uint8, device=device)
                broadcast(group, buffer)
                yield from unpack_bucket(buffer, bucket)

        self._reload(received())
        return len(metas)

    def kuberlhf_named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """Parameters that still hold plain tensors (the CPU backend repacks linear weights away)."""
        worker: Any = self
        model = worker.model_runner.model
        return [(name, p.detach().cpu().clone()) for name, p in model.named_parameters() if p.numel()]

    def _reload(self, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
        worker: Any = self
        worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
