"""Trainer → rollout weight sync: seconds and bytes/s per sync, by model size and transport.

    .venv/bin/python bench/weight_sync.py [--sizes 1M,10M,50M,100M] [--quick] [--out DIR]

Drives the project's own transports (kuberlhf_workers.base.transports) the way a training step
does, with fp32 tensors shaped like a Qwen2-style transformer (embeddings, per-layer q/k/v/o
with biases, MLP, norms, head):

- gloo, bucketed: CollectiveTransport with the default 64 MiB buckets (and 4 MiB ones, for
  comparison), trainer and engine in two OS processes (spawned; no Ray needed for a
  collective group);
- gloo, per-parameter: the same transport with a bucket of one parameter each (what a sync
  that broadcasts parameter by parameter costs);
- gloo, raw: one torch.distributed broadcast of a buffer holding all the bytes, no packing or
  unpacking: the floor the transport is measured against;
- object-store: ObjectStoreTransport between two Ray actors, driven as the driver does;
- with two or more GPUs, the same collective rows over NCCL (raw NCCL is the physical
  reference there). A single GPU cannot hold both ranks (NCCL refuses two ranks on one
  device), so NCCL is reported as skipped with the reason.

Every sync is timed from the moment the trainer starts sending until the engine has loaded
the last tensor (the engine acknowledges over a pipe), and every case checks that the
engine ends with exactly the trainer's tensors.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import summary  # noqa: E402

DEFAULT_BUCKET_MB = (64, 4)  # spec.weightSync.bucketMB's default first, then a cache-sized one
GOAL_SIZE, GOAL_RATIO = "100M", 5.0
TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Layout:
    """The dimensions of a decoder-only transformer; only the shapes matter here."""

    hidden: int
    layers: int
    intermediate: int
    vocab: int


SIZES: dict[str, Layout] = {
    "1M": Layout(hidden=128, layers=4, intermediate=384, vocab=1024),
    "10M": Layout(hidden=256, layers=8, intermediate=1024, vocab=4096),
    "50M": Layout(hidden=512, layers=12, intermediate=1536, vocab=8192),
    "100M": Layout(hidden=768, layers=12, intermediate=2048, vocab=16384),
}
QUICK_SIZES = ("1M", "10M")


def transformer_shapes(layout: Layout) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes in a Qwen2-like model's order (q/k/v carry biases, so a sync
    also moves many small tensors, as real ones do)."""
    h, i = layout.hidden, layout.intermediate
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (layout.vocab, h))]
    for n in range(layout.layers):
        p = f"model.layers.{n}"
        shapes.append((f"{p}.input_layernorm.weight", (h,)))
        for proj in ("q_proj", "k_proj", "v_proj"):
            shapes += [(f"{p}.self_attn.{proj}.weight", (h, h)), (f"{p}.self_attn.{proj}.bias", (h,))]
        shapes += [
            (f"{p}.self_attn.o_proj.weight", (h, h)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.mlp.gate_proj.weight", (i, h)),
            (f"{p}.mlp.up_proj.weight", (i, h)),
            (f"{p}.mlp.down_proj.weight", (h, i)),
        ]
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (layout.vocab, h))]
    return shapes


def parameter_count(shapes: list[tuple[str, tuple[int, ...]]]) -> int:
    total = 0
    for _, shape in shapes:
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def size_fields(size: str) -> dict[str, Any]:
    """The columns every row of one model size starts with."""
    shapes = transformer_shapes(SIZES[size])
    return {"size": size, "parameters": parameter_count(shapes), "tensors": len(shapes)}


def parse_sizes(text: str) -> list[str]:
    """`--sizes 1M,100M` → ["1M", "100M"]; anything else names the sizes there are."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in SIZES]
    if not names or unknown:
        raise ValueError(
            f"--sizes: unknown size(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(SIZES)}"
        )
    return names


def timing(seconds: list[float], nbytes: int) -> dict[str, Any]:
    """The median sync (robust to a noisy neighbour) and the bytes/s it implies."""
    if not seconds:
        raise ValueError("no timed syncs to summarise")
    median = statistics.median(seconds)
    return {
        "seconds": seconds,
        "median_s": median,
        "min_s": min(seconds),
        "bytes_per_s": nbytes / median if median > 0 else None,
    }


def bucketed_mode(backend: str, bucket_mb: int) -> str:
    return f"{backend}-bucketed-{bucket_mb}MiB"


def speedups(rows: list[dict[str, Any]], backend: str, bucket_mb: int) -> dict[str, float]:
    """Per size: per-parameter median seconds / `bucket_mb`-bucketed median seconds on `backend`
    (above 1: bucketing is faster)."""
    by_case = {(r["size"], r["mode"]): r["median_s"] for r in rows}
    out = {}
    for size in dict.fromkeys(r["size"] for r in rows):
        bucketed = by_case.get((size, bucketed_mode(backend, bucket_mb)))
        per_param = by_case.get((size, f"{backend}-per-parameter"))
        if bucketed and per_param:
            out[size] = per_param / bucketed
    return out


def parse_bucket_mb(text: str) -> list[int]:
    """`--bucket-mb 64,4` → [64, 4]: whole MiB, at least 1, no repeats."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1 or len(set(values)) != len(values):
        raise ValueError(f"--bucket-mb: expected distinct whole MiB >= 1 separated by commas, got {text!r}")
    return values


def fingerprint(named: Iterable[tuple[str, Any]]) -> list[tuple[str, float]]:
    """Per tensor, its name and float64 sum: equal lists mean every tensor arrived, in its place."""
    return [(name, float(t.double().sum())) for name, t in named]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- the two ends ---------------------------------------------------------------------------------


def _device(backend: str, rank: int) -> Any:
    import torch

    if backend == "nccl":
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    return torch.device("cpu")


def _weights(size: str, device: Any, seed: int = 0) -> dict[str, Any]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(shape, generator=generator).to(device)
        for name, shape in transformer_shapes(SIZES[size])
    }


def _plan(size: str, bucket_bytes: int) -> list[list[Any]]:
    from kuberlhf_workers.base.transports import ParamMeta, plan_buckets

    meta = [ParamMeta(n, s, "float32") for n, s in transformer_shapes(SIZES[size])]
    plan: list[list[Any]] = plan_buckets(meta, bucket_bytes)
    return plan


def _raw_group(backend: str, port: int, rank: int) -> Any:
    """A bare process group of two, built as the transport builds its own."""
    import torch.distributed as dist

    timeout = timedelta(seconds=TIMEOUT_S)
    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timeout=timeout)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, 2, options)
    return dist.ProcessGroupGloo(store, rank, 2, timeout)


def _sync_point(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _unflatten(flat: Any, like: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    offset = 0
    for name, p in like.items():
        yield name, flat[offset : offset + p.numel()].view(p.shape)
        offset += p.numel()


@dataclass(frozen=True)
class Sink:
    """A receiving end's engine: whatever `load_weights` does with the tensors."""

    load_weights: Callable[[Iterable[tuple[str, Any]]], None]


def engine_process(conn: Connection) -> None:
    """Rank 1: receives every case the trainer announces, until it announces None."""
    import torch

    torch.set_num_threads(1)
    while (case := conn.recv()) is not None:
        receive_case(conn, *case)


def receive_case(conn: Connection, size: str, mode: str, backend: str, bucket_bytes: int, port: int,
                 syncs: int) -> None:
    """One case on the engine side: acknowledge each sync once every tensor is loaded, then send
    the fingerprint of what arrived."""
    import torch

    from kuberlhf_workers.base.transports import CollectiveTransport

    device = _device(backend, 1)
    params = {n: torch.zeros(s, device=device) for n, s in transformer_shapes(SIZES[size])}

    def load(named: Iterator[tuple[str, Any]]) -> None:
        for name, tensor in named:
            params[name].copy_(tensor)

    if mode == "raw":
        group = _raw_group(backend, port, 1)
        flat = torch.empty(parameter_count(transformer_shapes(SIZES[size])), device=device)
    else:
        transport = CollectiveTransport("127.0.0.1", port, 1, 2, backend, _plan(size, bucket_bytes),
                                        TIMEOUT_S)
        transport.connect()
    for _ in range(syncs):
        conn.send("ready")
        if mode == "raw":
            group.broadcast(flat, 0).wait()
        else:
            transport.receive(None, Sink(load))
        _sync_point(device)
        conn.send("done")
        if mode == "raw":  # unpacked after the acknowledgement: raw times the broadcast alone
            load(_unflatten(flat, params))
    conn.send(fingerprint((n, p.cpu()) for n, p in params.items()))


def run_collective(
    conn: Connection, size: str, mode: str, backend: str, bucket_mb: int, warmup: int, repeats: int
) -> dict[str, Any]:
    """Rank 0 of one case: `warmup` untimed syncs, then `repeats` timed ones. `bucket_mb` 0 means
    one parameter per bucket."""
    import torch

    from kuberlhf_workers.base.transports import CollectiveTransport

    port = free_port()
    bucket_bytes = bucket_mb * 2**20 or 1
    conn.send((size, mode, backend, bucket_bytes, port, warmup + repeats))
    device = _device(backend, 0)
    weights = _weights(size, device)
    plan = _plan(size, bucket_bytes)
    if mode == "raw":  # the broadcast alone: packed once, before the clock runs
        group = _raw_group(backend, port, 0)
        flat = torch.cat([t.reshape(-1) for t in weights.values()])
    else:
        sender = CollectiveTransport("127.0.0.1", port, 0, 2, backend, plan, TIMEOUT_S)
        sender.connect()
    times = []
    for n in range(warmup + repeats):
        if conn.recv() != "ready":
            raise RuntimeError("the engine process fell out of step")
        started = time.perf_counter()
        if mode == "raw":
            group.broadcast(flat, 0).wait()
        else:
            sender.send([[(m.name, weights[m.name]) for m in bucket] for bucket in plan])
        _sync_point(device)
        if conn.recv() != "done":
            raise RuntimeError("the engine process fell out of step")
        if n >= warmup:
            times.append(time.perf_counter() - started)
    received = conn.recv()
    nbytes = sum(t.numel() * t.element_size() for t in weights.values())
    return {
        "mode": bucketed_mode(backend, bucket_mb) if mode == "bucketed" else f"{backend}-{mode}",
        "buckets": 1 if mode == "raw" else len(plan),
        "bytes": nbytes,
        "verified": received == fingerprint((n, t.cpu()) for n, t in weights.items()),
        **timing(times, nbytes),
    }


def run_object_store(sizes: list[str], warmup: int, repeats: int) -> list[dict[str, Any]]:
    """ObjectStoreTransport between a trainer actor and an engine actor on a private local Ray."""
    import ray
    import torch

    from kuberlhf_workers.base.transports import ObjectStoreTransport

    @ray.remote(num_cpus=1)
    class Trainer:
        def __init__(self, size: str) -> None:
            torch.set_num_threads(1)
            self.weights = _weights(size, torch.device("cpu"))
            self.transport = ObjectStoreTransport(TIMEOUT_S)

        def send(self) -> Any:
            return self.transport.send([list(self.weights.items())])

        def fingerprint(self) -> list[tuple[str, float]]:
            return fingerprint(self.weights.items())

    @ray.remote(num_cpus=1)
    class Engine:
        def __init__(self, size: str) -> None:
            torch.set_num_threads(1)
            self.params = {n: torch.zeros(s) for n, s in transformer_shapes(SIZES[size])}
            self.transport = ObjectStoreTransport(TIMEOUT_S)

        def receive(self, payload: Any) -> None:
            def load(named: Iterable[tuple[str, Any]]) -> None:
                for name, tensor in named:
                    self.params[name].copy_(tensor)

            self.transport.receive(payload, Sink(load))

        def fingerprint(self) -> list[tuple[str, float]]:
            return fingerprint(self.params.items())

    largest = max(parameter_count(transformer_shapes(SIZES[s])) for s in sizes) * 4
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=max(4 * largest, 256 * 2**20),
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    rows = []
    try:
        for size in sizes:
            trainer, engine = Trainer.remote(size), Engine.remote(size)
            times = []
            for n in range(warmup + repeats):
                started = time.perf_counter()
                payload = trainer.send.remote()  # as the driver does: the engine waits on the put
                ray.get(engine.receive.remote(payload), timeout=TIMEOUT_S)
                if n >= warmup:
                    times.append(time.perf_counter() - started)
                del payload
            expected, got = ray.get([trainer.fingerprint.remote(), engine.fingerprint.remote()])
            fields = size_fields(size)
            nbytes = fields["parameters"] * 4
            rows.append({**fields, "mode": "object-store", "buckets": 1, "bytes": nbytes,
                         "verified": expected == got, **timing(times, nbytes)})
            print(summary.weight_sync_line(rows[-1]), flush=True)
            ray.kill(trainer)
            ray.kill(engine)
    finally:
        ray.shutdown()
    return rows


def collective_cases(bucket_mb: list[int]) -> list[tuple[str, int]]:
    return [("raw", 0), *(("bucketed", mb) for mb in bucket_mb), ("per-parameter", 0)]


def nccl_skip_reason() -> str | None:
    """None when NCCL can be measured here, else why not (printed and recorded)."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False): NCCL runs only on GPU machines"
    if torch.cuda.device_count() < 2:
        return "one GPU only: NCCL refuses two ranks on the same device, so trainer and engine need 2 GPUs"
    return None


def run_all(
    sizes: list[str], bucket_mb: list[int], warmup: int, repeats: int
) -> tuple[list[dict[str, Any]], str | None]:
    skip = nccl_skip_reason()
    backends = ["gloo"] + ([] if skip else ["nccl"])
    rows: list[dict[str, Any]] = []
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    engine = context.Process(target=engine_process, args=(child,), name="weight-sync-engine", daemon=True)
    engine.start()
    child.close()  # so a crashed engine reads as EOFError here instead of a hang
    try:
        for size in sizes:
            for backend in backends:
                for mode, mb in collective_cases(bucket_mb):
                    row = run_collective(parent, size, mode, backend, mb, warmup, repeats)
                    rows.append({**size_fields(size), **row})
                    print(summary.weight_sync_line(rows[-1]), flush=True)
        parent.send(None)
        engine.join(timeout=30)
    finally:
        if engine.is_alive():
            engine.kill()
    return rows + run_object_store(sizes, warmup, repeats), skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, from {', '.join(SIZES)}")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: sizes {','.join(QUICK_SIZES)}, 2 timed syncs per case")
    parser.add_argument("--repeats", type=int, default=5, help="timed syncs per case (default 5)")
    parser.add_argument("--bucket-mb", default=",".join(map(str, DEFAULT_BUCKET_MB)),
                        help="bucket sizes in MiB, comma-separated; the goal uses the first (default 64,4)")
    parser.add_argument("--out", type=Path,
                        help="output folder (default bench/out/<UTC timestamp>-weight-sync)")
    args = parser.parse_args(argv)
    try:
        sizes = list(QUICK_SIZES) if args.quick else parse_sizes(args.sizes)
        bucket_mb = parse_bucket_mb(args.bucket_mb)
    except ValueError as exc:
        parser.error(str(exc))
    repeats = 2 if args.quick else args.repeats
    if repeats < 1:
        parser.error(f"--repeats must be at least 1, got {repeats}")
    os.environ.update(OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")

    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    out: Path = (args.out or BENCH / "out" / f"{stamp}-weight-sync").resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows, nccl_skipped = run_all(sizes, bucket_mb, warmup=1, repeats=repeats)
    import torch

    bucketed_speedup = {
        backend: {f"{mb}MiB": speedups(rows, backend, mb) for mb in bucket_mb} for backend in ("gloo", "nccl")
    }
    goal = bucketed_speedup["gloo"][f"{bucket_mb[0]}MiB"].get(GOAL_SIZE)
    results = {
        "benchmark": "weight-sync",
        "created": stamp,
        "config": {"sizes": sizes, "repeats": repeats, "warmup": 1, "bucket_mb": bucket_mb,
                   "quick": args.quick, "layouts": {s: asdict(SIZES[s]) for s in sizes}},
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor(), "torch": torch.__version__,
                    "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0},
        "rows": rows,
        "bucketed_speedup": bucketed_speedup,
        "goal": {"size": GOAL_SIZE, "bucket": f"{bucket_mb[0]}MiB", "target": GOAL_RATIO, "ratio": goal},
        "nccl_skipped": nccl_skipped,
        "wall_s": time.perf_counter() - started,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print()
    print(summary.weight_sync_table([results]))
    print(f"\nresults: {out / 'results.json'}")
    unverified = [f"{r['size']} {r['mode']}" for r in rows if not r["verified"]]
    if unverified:
        print(f"engine weights differ from the trainer's after: {', '.join(unverified)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
