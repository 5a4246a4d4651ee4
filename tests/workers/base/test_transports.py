"""Weight sync: after a sync the rollout engine holds exactly the trainer's weights."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

from kuberlhf.placement import resolve_transport
from kuberlhf_workers.base.transports import (
    CollectiveTransport,
    ObjectStoreTransport,
    ParamMeta,
    param_meta,
    plan_buckets,
)

pytestmark = pytest.mark.timeout(120)


@pytest.mark.unit
def test_buckets_group_parameters_up_to_the_size_limit_and_never_mix_dtypes():
    meta = [
        ParamMeta("a", (256,), "float32"),
        ParamMeta("b", (256,), "float32"),
        ParamMeta("c", (1024,), "float32"),
        ParamMeta("d", (8,), "bfloat16"),
        ParamMeta("e", (8,), "bfloat16"),
    ]
    buckets = plan_buckets(meta, bucket_bytes=2048)
    assert [[m.name for m in b] for b in buckets] == [["a", "b"], ["c"], ["d", "e"]]


@pytest.mark.unit
def test_auto_transport_is_gloo_on_cpu_and_nccl_on_gpu_and_nccl_needs_gpus():
    assert resolve_transport("auto", on_gpu=False) == "gloo"
    assert resolve_transport("auto", on_gpu=True) == "nccl"
    with pytest.raises(ValueError, match=r"spec\.weightSync\.transport"):
        resolve_transport("nccl", on_gpu=False)


def _weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "embed.weight": torch.randn(50, 16),
        "layer.0.weight": torch.randn(16, 16),
        "layer.0.bias": torch.randn(16),
        "head.weight": torch.randn(50, 16),
    }


class _Engine:
    """The receiving side's model: named parameters that load_weights overwrites in place."""

    def __init__(self, like: dict[str, torch.Tensor]):
        self.params = {k: torch.zeros_like(v) for k, v in like.items()}
        self.calls = 0

    def load_weights(self, named):
        self.calls += 1
        for name, tensor in named:
            self.params[name].copy_(tensor)


def test_gloo_transport_delivers_every_tensor_exactly_in_few_broadcasts_through_one_reused_buffer():
    from kuberlhf_workers.base.transports import free_address

    weights = _weights() | {"norm.weight": torch.randn(16).to(torch.bfloat16)}
    plan = plan_buckets([param_meta(n, t) for n, t in weights.items()], bucket_bytes=4096)
    assert 1 < len(plan) < len(weights) and {b[0].dtype for b in plan} == {"float32", "bfloat16"}
    host, port = free_address()
    sender = CollectiveTransport(host, port, 0, 3, "gloo", plan, 30.0)
    receivers = [CollectiveTransport(host, port, r, 3, "gloo", plan, 30.0) for r in (1, 2)]
    engines = [_Engine(weights) for _ in receivers]
    syncs = [weights, {k: v * 2 - 1 for k, v in weights.items()}]  # the second sync overwrites the first
    buffers: list[set[int]] = [set(), set()]

    def receive(transport: CollectiveTransport, engine: _Engine, seen: set[int]) -> None:
        transport.connect()
        for _ in syncs:
            transport.receive(None, engine)
            seen.update(b.data_ptr() for b in transport._buffers)

    threads = [
        threading.Thread(target=receive, args=args) for args in zip(receivers, engines, buffers, strict=True)
    ]
    for t in threads:
        t.start()
    sender.connect()
    for sent in syncs:
        sender.send([[(m.name, sent[m.name]) for m in bucket] for bucket in plan])
    for t in threads:
        t.join(timeout=30)
    for engine, seen in zip(engines, buffers, strict=True):
        assert engine.calls == 2 * len(plan)
        assert len(seen) == 2, "two receive buffers, allocated once and reused"
        for name, tensor in syncs[-1].items():
            assert torch.equal(engine.params[name], tensor), name


def test_object_store_transport_delivers_the_state_dict(ray_session):
    weights = _weights()
    transport = ObjectStoreTransport(30.0)
    payload = transport.send([list(weights.items())])
    engine = _Engine(weights)
    transport.receive(payload, engine)
    for name, tensor in weights.items():
        assert torch.equal(engine.params[name], tensor), name


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_a_sync_whose_sender_never_sends_times_out_instead_of_hanging():
    from kuberlhf_workers.base.transports import free_address

    weights = _weights()
    plan = plan_buckets([param_meta(n, t) for n, t in weights.items()], bucket_bytes=4096)
    host, port = free_address()
    sender = CollectiveTransport(host, port, 0, 2, "gloo", plan, 2.0)
    receiver = CollectiveTransport(host, port, 1, 2, "gloo", plan, 2.0)
    joined = threading.Thread(target=sender.connect)
    joined.start()
    receiver.connect()
    joined.join(timeout=30)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"(?i)timed? ?out"):
        receiver.receive(None, _Engine(weights))  # the trainer is stuck elsewhere
    assert time.monotonic() - started < 20


@pytest.mark.unit
def test_rendezvous_ports_come_from_below_the_kernels_ephemeral_range(tmp_path):
    from kuberlhf_workers.base.transports import free_port

    ranges = tmp_path / "ip_local_port_range"
    ranges.write_text("32768\t60999\n")
    ports = {free_port(str(ranges)) for _ in range(20)}
    assert all(20000 <= p < 32768 for p in ports), ports
    assert len(ports) > 1, "the same port every time collides between concurrent jobs"
    with socket.socket() as s:
        s.bind(("", ports.pop()))  # free when handed out

    ranges.write_text("1024\t65000\n")  # nothing below the kernel's range: its choice
    assert free_port(str(ranges)) >= 1024
