"""Moving updated weights from trainer rank 0 to every rollout engine.

Transports behind one small interface (`WeightTransport`: sender `send`, receiver `receive`),
named in one table (`TRANSPORTS`, keyed like the API's `weightSync.transport`):

- collective: a torch.distributed group of its own (trainer rank 0 + every rollout engine,
  gloo on CPU, NCCL on GPU), separate from the trainers' data-parallel world so neither can
  deadlock the other. Parameters travel in buckets of ~bucketMB flattened into one buffer:
  a few large broadcasts instead of one call per parameter (the known bottleneck). Each end
  keeps two buffers the size of the largest bucket for the transport's lifetime (allocating a
  fresh one per bucket costs page faults that made 64 MiB buckets ~3x slower than
  per-parameter broadcasts on CPU) and packs or unpacks one while the other is on the wire.
- object-store: rank 0 `ray.put`s the state dict once; every engine reads it. Slower, but
  needs no open ports between pods.

Both sides derive the same bucket plan from the same parameter list, so only tensors, never
names or shapes, go over the wire during a sync.

With `rollout.engine: vllm` the receiving end lives inside vLLM's workers instead, behind vLLM's
own weight-transfer API (`base.engine_transports`); the plan and the wire format are these.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Any, ClassVar, Protocol

import torch

from kuberlhf.api import WeightTransportName

NamedTensors = list[tuple[str, torch.Tensor]]


class WeightSink(Protocol):
    """What a receiving end feeds: the rollout engine (every backend can load full HF-named tensors)."""

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load the tensors; they may be views of a buffer the next bucket overwrites (copy them)."""
        ...


class WeightTransport(Protocol):
    """One end of a weight sync: trainer rank 0 sends, every rollout engine receives.

    `receivers_wait_for_sender`: receivers need what `send` returns (the payload), so they start
    after it; otherwise every member must be inside the transfer at once (a collective), and
    nobody may wait for anybody. Control code reads this instead of the transport's name.
    """

    receivers_wait_for_sender: ClassVar[bool]

    def connect(self, engine: WeightSink | None = None) -> None:
        """Join the transport (for a collective: blocks until every member joined). A receiving end
        is given the engine it feeds: some join from inside it."""
        ...

    def send(self, buckets: Iterable[NamedTensors]) -> Any:
        """Send full tensors bucket by bucket; returns the payload receivers are given (or None)."""
        ...

    def receive(self, payload: Any, engine: WeightSink) -> None:
        """Receive one sync into `engine`."""
        ...


@dataclass(frozen=True)
class ParamMeta:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def param_meta(name: str, param: torch.Tensor) -> ParamMeta:
    """Full (unpartitioned) shape: ZeRO-3 keeps it in `ds_shape` while the tensor is a shard."""
    shape = tuple(getattr(param, "ds_shape", param.shape))
    return ParamMeta(name, shape, str(param.dtype).removeprefix("torch."))


def plan_buckets(meta: list[ParamMeta], bucket_bytes: int) -> list[list[ParamMeta]]:
    """Group parameters, in order, into same-dtype buckets of at most `bucket_bytes` (a larger
    parameter gets a bucket of its own)."""
    buckets: list[list[ParamMeta]] = []
    current: list[ParamMeta] = []
    size = 0
    for m in meta:
        nbytes = m.numel * torch.empty((), dtype=m.torch_dtype).element_size()
        if current and (size + nbytes > bucket_bytes or current[0].dtype != m.dtype):
            buckets.append(current)
            current, size = [], 0
        current.append(m)
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


def free_address() -> tuple[str, int]:
    """This node's IP and a free TCP port for a rendezvous store."""
    import ray

    return ray.util.get_node_ip_address(), free_port()


def free_port(ephemeral_range: str = "/proc/sys/net/ipv4/ip_local_port_range") -> int:
    """A port that is free now and that the kernel will not hand out on its own.

    The port is released before torch binds it; one taken from the kernel's ephemeral range
    (`bind(0)`) can meanwhile go to any outgoing connection or `bind(0)` of Ray, gRPC or vLLM on
    the node, and the rendezvous then fails with EADDRINUSE (seen in CI). Below that range only
    an explicit bind can take it."""
    try:
        with open(ephemeral_range) as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    candidates = list(range(_LOWEST_PORT, low))
    random.SystemRandom().shuffle(candidates)
    for port in candidates[:64]:
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        return port
    with socket.socket() as s:  # no range below the kernel's: its choice is all there is
        s.bind(("", 0))
        return int(s.getsockname()[1])


_LOWEST_PORT = 20000  # above the well-known and most registered service ports


def bucket_nbytes(bucket: list[ParamMeta]) -> int:
    """Bytes of one bucket's flat buffer (a bucket holds one dtype)."""
    return sum(m.numel for m in bucket) * torch.empty((), dtype=bucket[0].torch_dtype).element_size()


def split_bucket(flat: torch.Tensor, bucket: list[ParamMeta]) -> Iterator[tuple[str, torch.Tensor]]:
    """The bucket's parameters as views into its flat buffer, in plan order."""
    offset = 0
    for m in bucket:
        yield m.name, flat[offset : offset + m.numel].view(m.shape)
        offset += m.numel


@dataclass
class CollectiveTransport:
    """One end of the sync group: rank 0 is the trainer, ranks 1..N the rollout engines.

    Picklable until `connect()`, so the driver builds one per member and ships it to its actor.
    """

    receivers_wait_for_sender: ClassVar[bool] = False
    host: str
    port: int
    rank: int
    world_size: int
    backend: str
    plan: list[list[ParamMeta]]
    timeout_s: float
    _group: Any = None
    _buffers: list[torch.Tensor] = field(default_factory=list)

    def connect(self, engine: WeightSink | None = None) -> None:
        import torch.distributed as dist

        timeout = timedelta(seconds=self.timeout_s)
        store = dist.TCPStore(  # type: ignore[attr-defined]  # exported at run time, not in the stubs
            self.host, self.port, self.world_size, self.rank == 0, timeout=timeout
        )
        if self.backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self._group = dist.ProcessGroupNCCL(store, self.rank, self.world_size, options)
        else:
            self._group = dist.ProcessGroupGloo(store, self.rank, self.world_size, timeout)

    @property
    def device(self) -> torch.device:
        return torch.device("cuda") if self.backend == "nccl" else torch.device("cpu")

    def _buffer(self, slot: int) -> torch.Tensor:
        """One of two reused flat buffers, each sized to the largest bucket: while one is on the
        wire the other is packed (sender) or unpacked (receiver). A plan mixing dtypes is served
        by byte buffers viewed per bucket."""
        if not self._buffers:
            largest = max((bucket_nbytes(bucket) for bucket in self.plan), default=0)
            self._buffers = [torch.empty(largest, dtype=torch.uint8, device=self.device) for _ in range(2)]
        return self._buffers[slot]

    def send(self, buckets: Iterable[NamedTensors]) -> None:
        in_flight: list[Any] = [None, None]  # the broadcast reading each buffer
        for k, bucket in enumerate(buckets):
            tensors = [t.detach() for _, t in bucket]
            on_device = tensors[0].device.type == self.device.type  # cuda:0 is "cuda" too
            if len(tensors) == 1 and tensors[0].is_contiguous() and on_device:
                # A lone parameter goes out as it is, no copy; synchronously, because the caller
                # may free it as soon as the next bucket is asked for (ZeRO-3 re-partitions it).
                self._group.broadcast(tensors[0].reshape(-1), 0).wait()
                continue
            slot = k % 2
            if in_flight[slot] is not None:
                in_flight[slot].wait()
            nbytes = sum(t.numel() * t.element_size() for t in tensors)
            flat = self._buffer(slot)[:nbytes].view(tensors[0].dtype)
            torch.cat([t.reshape(-1).to(self.device) for t in tensors], out=flat)
            in_flight[slot] = self._group.broadcast(flat, 0)
        for work in in_flight:
            if work is not None:
                work.wait()

    def receive(self, payload: Any, engine: WeightSink) -> None:
        """`engine.load_weights` gets views into the reused buffers: it must copy them before it
        returns, because a later bucket overwrites them (every backend's load_weights copies into
        its parameters).
        Bucket k+1 is already arriving while bucket k is loaded."""

        def post(k: int) -> tuple[torch.Tensor, Any]:
            bucket = self.plan[k]
            flat = self._buffer(k % 2)[: bucket_nbytes(bucket)].view(bucket[0].torch_dtype)
            return flat, self._group.broadcast(flat, 0)

        upcoming = post(0) if self.plan else None
        for k, bucket in enumerate(self.plan):
            assert upcoming is not None
            flat, work = upcoming
            work.wait()
            # The other buffer held bucket k-1, loaded in the previous round: free to receive into.
            upcoming = post(k + 1) if k + 1 < len(self.plan) else None
            engine.load_weights(split_bucket(flat, bucket))


@dataclass
class ObjectStoreTransport:
    """The state dict goes through Ray's object store: rank 0 puts it once, engines get it."""

    receivers_wait_for_sender: ClassVar[bool] = True
    timeout_s: float

    def connect(self, engine: WeightSink | None = None) -> None:
        return None

    def send(self, buckets: Iterable[NamedTensors]) -> list[Any]:
        import ray

        state = {name: t.detach().to("cpu", copy=True) for bucket in buckets for name, t in bucket}
        return [ray.put(state)]  # wrapped in a list so Ray passes the reference, not the value

    def receive(self, payload: Any, engine: WeightSink) -> None:
        import ray

        state = ray.get(payload[0], timeout=self.timeout_s)
        engine.load_weights(state.items())


Transports = tuple[WeightTransport, list[WeightTransport]]


def _collective(
    backend: str, address: tuple[str, int], engines: int, plan: list[list[ParamMeta]], timeout_s: float
) -> Transports:
    host, port = address
    world = engines + 1
    sender = CollectiveTransport(host, port, 0, world, backend, plan, timeout_s)
    receivers: list[WeightTransport] = [
        CollectiveTransport(host, port, i + 1, world, backend, plan, timeout_s) for i in range(engines)
    ]
    return sender, receivers


def _object_store(
    address: tuple[str, int], engines: int, plan: list[list[ParamMeta]], timeout_s: float
) -> Transports:
    receivers: list[WeightTransport] = [ObjectStoreTransport(timeout_s) for _ in range(engines)]
    return ObjectStoreTransport(timeout_s), receivers


@dataclass(frozen=True)
class TransportKind:
    """How to build one sync's ends, and whether they meet at a host:port of trainer rank 0."""

    make: Callable[[tuple[str, int], int, list[list[ParamMeta]], float], Transports]
    rendezvous: bool


TRANSPORTS: dict[WeightTransportName, TransportKind] = {
    "nccl": TransportKind(partial(_collective, "nccl"), rendezvous=True),
    "gloo": TransportKind(partial(_collective, "gloo"), rendezvous=True),
    "object-store": TransportKind(_object_store, rendezvous=False),
}
