"""gpu_check's throughput checks, with what the lent GPU machine has (torch, transformers, the
carried DeepSpeed; no vLLM, no Ray). bench/gpu.py measures the full path where those exist; its
steady-state summary, prompts and reward are reused here, so the numbers read the same.

- grpo_step: one process holds the HF rollout engine and a ZeRO-2 `DeepSpeedRank` of the same
  model, as a colocated pair shares one GPU. Each step: generate; score (bench/rewards/digits.py
  through the project's `score`); collate and `make_experience`; per micro-batch the policy loss's
  forward (log-probs), backward and optimizer step, as `TrainerWorker.train` runs them; then
  `DeepSpeedRank.send_weights` straight into the engine's `load_weights` (no wire here: the
  weight_sync check measures it). The device is synchronised at every phase edge, which costs
  the little overlap a real step would have.
- weight_sync: trainer and engine in two processes, over the wire the project picks for this
  machine (`resolve_transport`: gloo when the engine shares the trainer's only GPU, as NCCL
  refuses two ranks on one device; NCCL with two GPUs). `CollectiveTransport`'s bucketed send and
  receive of the trained Llama's bf16 state, alternated with `torch.distributed.broadcast` of one
  tensor of the same bytes on the same device; ratio = bucketed median s / raw median s.
"""

from __future__ import annotations

import math
import socket
import statistics
import time
import types
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta
from functools import partial
from typing import Any

import gpu  # bench/gpu.py
import torch
from common import prompt_records
from gpu_common import (
    GIB,
    NEEDS_CUDA,
    Result,
    Sizes,
    free_port,
    job_spec,
    llama_state,
    rollout_model,
    spawn,
    sync_cuda,
)

TRAIN_PHASES = ("experience", "forward", "backward", "optimizer")  # what TrainerWorker.train does
PHASES = ("generate", "reward", *TRAIN_PHASES, "sync")


# -- grpo_step ------------------------------------------------------------------------------------


class Phases:
    """Seconds per named phase, summed over its calls (one per micro-batch for the train phases)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda, self.seconds = cuda, dict.fromkeys(PHASES, 0.0)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        sync_cuda(self.cuda)  # a phase's kernels count in it, not in the next one
        start = time.perf_counter()
        yield
        sync_cuda(self.cuda)
        self.seconds[name] += time.perf_counter() - start


class EngineSink:
    """`DeepSpeedRank.sender` for an engine in the same process: each bucket into its load_weights."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def send(self, buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> None:
        for bucket in buckets:
            self.engine.load_weights(bucket)


def driver_row(phases: dict[str, float], rows: int, tokens: int) -> dict[str, float]:
    """One step as the driver's metrics.jsonl has it, which bench/gpu.py's steady_state reads: train
    is experience + forward + backward + optimizer, as TrainerWorker.train does all four."""
    return {"samples_per_second": rows / sum(phases.values()), "time_rollout_s": phases["generate"],
            "time_reward_s": phases["reward"], "time_train_s": sum(phases[p] for p in TRAIN_PHASES),
            "time_sync_s": phases["sync"], "rollout_tokens": tokens}


def _stale(engine: Any, module: torch.nn.Module) -> int:
    """Engine tensors that differ from the trainer's (in the engine's dtype)."""
    trained = dict(module.named_parameters())
    return sum(not torch.equal(p, trained[n].detach().to(p.dtype)) for n, p in engine.named_parameters())


def grpo_child(sizes: Sizes, cuda: bool, workdir: str) -> Result:
    from kuberlhf_workers.base.precision import compute_dtype
    from kuberlhf_workers.base.samples import GenerationRequest
    from kuberlhf_workers.rewards.sources import load_reward_function, score
    from kuberlhf_workers.rollout.hf import HFBackend
    from kuberlhf_workers.training.batch import collate
    from kuberlhf_workers.training.experience import make_experience
    from kuberlhf_workers.training.layout import train_layout
    from kuberlhf_workers.training.objectives import PolicyObjective
    from kuberlhf_workers.training.rank import DeepSpeedRank

    prompts, samples, new_tokens = sizes.hf_rows
    spec = job_spec(2, replace(sizes, prompts=prompts, samples=samples, new_tokens=new_tokens,
                               micro=sizes.grpo_micro), cuda)
    device, path = torch.device("cuda" if cuda else "cpu"), rollout_model(sizes, workdir)
    start = time.perf_counter()
    engine = HFBackend(path, device, compute_dtype(spec.precision, device))
    load_s, pad_id = time.perf_counter() - start, engine.tokenizer.pad_token_id
    objective = PolicyObjective(spec, device)
    layout = train_layout(prompts * samples, objective.trainer, "actor")
    rank = DeepSpeedRank("actor", objective.trainer, layout, 0, device, spec.precision)
    start = time.perf_counter()
    rank.join(("127.0.0.1", free_port()), partial(objective.build_model, str(path), pad_id), timeout_s=120)
    init_s, model = time.perf_counter() - start, rank.model
    rank.sender = EngineSink(engine)  # send_weights calls only its send
    reward = load_reward_function(f"{gpu.REWARD_FILE}:reward", gpu.BENCH)
    request = GenerationRequest([r["prompt"] for r in prompt_records(0, prompts)], samples, new_tokens,
                                spec.rollout.temperature, max_prompt_tokens=spec.data.max_prompt_tokens)
    steps = []
    for seed in range(sizes.grpo_steps):
        phases, losses = Phases(cuda), []
        with phases("generate"):
            result = engine.generate(replace(request, seed=seed))
        with phases("reward"):
            scores = score(reward, result.prompts, result.responses)
        with phases("experience"):
            batch = collate(result, pad_id)
            exp = make_experience(spec, batch, torch.as_tensor(scores, dtype=torch.float32), None, None)
        for first in range(0, len(batch), layout.micro):
            with phases("forward"):
                loss, _ = objective.loss(model, exp, slice(first, first + layout.micro), device)
            with phases("backward"):
                model.backward(loss)
            with phases("optimizer"):
                model.step()  # DeepSpeed steps the optimizer at the accumulation boundary
            losses.append(float(loss.detach()))
        stale = _stale(engine, model.module)
        with phases("sync"):
            rank.send_weights(spec.weight_sync.bucket_mb * 2**20)
        steps.append({"phases_s": phases.seconds, "tokens": sum(len(r) for r in result.response_ids),
                      "losses": losses, "mean_reward": statistics.mean(scores), "stale_before_sync": stale,
                      "stale_after_sync": _stale(engine, model.module)})
    rows = [driver_row(s["phases_s"], len(batch), s["tokens"]) for s in steps]
    steady = steps[1:] or steps
    synced = all(s["stale_after_sync"] == 0 for s in steps)
    finite = all(math.isfinite(v) for s in steps for v in s["losses"])
    return {"ok": synced and finite and all(s["tokens"] > 0 for s in steps), "rows": len(batch),
            "micro": layout.micro, "accumulation": layout.accumulation, "dtype": str(engine.model.dtype),
            "parameters": sum(p.numel() for p in engine.model.parameters()), "engine_load_s": load_s,
            "trainer_init_s": init_s, **gpu.steady_state(rows, 1, len(batch)),
            "phase_detail_s": {p: statistics.mean(s["phases_s"][p] for s in steady) for p in PHASES},
            "synced": synced, "loss_finite": finite, "steps": steps,
            "measures": "steady numbers leave out the first step; train = experience + forward + backward "
            "+ optimizer; sync = DeepSpeedRank.send_weights into the engine in the same process (no wire)"}


def check_grpo(sizes: Sizes, cuda: bool, workdir: str, timeout: float) -> Result:
    return spawn([(grpo_child, (sizes, cuda, workdir))], timeout)[0]


# -- weight_sync ----------------------------------------------------------------------------------


def sync_end(rank: int, ports: tuple[int, int], sizes: Sizes, wire: str, cuda: bool) -> Result:
    """Rank 0 sends, rank 1 receives: each mode once untimed, then `sync_repeats` timed rounds, the
    modes alternated so that both see the same neighbours; each round starts at a barrier."""
    import torch.distributed as dist

    from kuberlhf_workers.base.transports import CollectiveTransport, param_meta, plan_buckets

    device = torch.device("cuda", rank if wire == "nccl" else 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    state = llama_state(sizes, device)  # the receiver regenerates what it must end with
    named, nbytes = dict(state), sum(t.numel() * t.element_size() for _, t in state)
    plan = plan_buckets([param_meta(n, t) for n, t in state], sizes.bucket_bytes)
    transport = CollectiveTransport("127.0.0.1", ports[0], rank, 2, wire, plan, 120.0)
    transport.connect()
    on_device = {"device_id": device} if wire == "nccl" else {}
    dist.init_process_group(wire, init_method=f"tcp://127.0.0.1:{ports[1]}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=120), **on_device)
    received = {n: torch.zeros_like(t) for n, t in state}

    def load(items: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in items:
            received[name].copy_(tensor)

    sink = types.SimpleNamespace(load_weights=load)  # the receiving engine

    def bucketed() -> None:
        if rank == 0:
            transport.send([(m.name, named[m.name]) for m in bucket] for bucket in plan)
        else:
            transport.receive(None, sink)

    raw = torch.empty(nbytes, dtype=torch.uint8, device=device)  # the same bytes, one tensor, same place
    modes = {"bucketed": bucketed, "raw": lambda: dist.broadcast(raw, src=0)}
    if cuda and wire == "gloo":  # the wire alone: what gloo's staging through host memory costs
        raw_host = torch.empty(nbytes, dtype=torch.uint8)
        modes["raw_host"] = lambda: dist.broadcast(raw_host, src=0)
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    for round_ in range(1 + sizes.sync_repeats):
        for mode, fn in modes.items():
            dist.barrier()
            sync_cuda(cuda)
            start = time.perf_counter()
            fn()
            sync_cuda(cuda)
            if round_:
                seconds[mode].append(time.perf_counter() - start)
    verified = None if rank == 0 else all(torch.equal(received[n].view(torch.int16), t.view(torch.int16))
                                          for n, t in state)
    dist.barrier()
    dist.destroy_process_group()
    return {"ok": True, "rank": rank, "seconds": seconds, "bytes": nbytes, "tensors": len(state),
            "buckets": len(plan), "verified": verified}


def two_ports() -> tuple[int, int]:
    """Two distinct free ports: the transport's own group and the raw broadcast's."""
    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        return int(a.getsockname()[1]), int(b.getsockname()[1])


def sync_summary(sender: Result, receiver: Result) -> Result:
    """A round lasts as long as its slower end (done when the trainer has sent and the engine has
    loaded the last tensor); per mode the median round, its GB/s, and ratio = bucketed / raw."""
    median_s = {mode: statistics.median(map(max, zip(sent, receiver["seconds"][mode], strict=True)))
                for mode, sent in sender["seconds"].items()}
    return {"median_s": median_s, "GBps": {mode: sender["bytes"] / s / 1e9 for mode, s in median_s.items()},
            "ratio": median_s["bucketed"] / median_s["raw"]}


def check_weight_sync(sizes: Sizes, cuda: bool, timeout: float) -> Result:
    from kuberlhf.placement import resolve_transport

    gpus = torch.cuda.device_count() if cuda else 0
    wire = resolve_transport("auto", cuda, colocated=gpus < 2)
    ports = two_ports()
    sender, receiver = spawn([(sync_end, (rank, ports, sizes, wire, cuda)) for rank in (0, 1)], timeout)
    if not (sender.get("ok") and receiver.get("ok")):
        ends = enumerate((sender, receiver))
        errors = "; ".join(f"rank {i}: {e.get('error')}" for i, e in ends if not e.get("ok"))
        return {"ok": False, "wire": wire, "error": errors, "ends": [sender, receiver]}
    out: Result = {"ok": bool(receiver["verified"]), "wire": wire, "device": "cuda" if cuda else "cpu",
                   "bytes": sender["bytes"], "parameters": sender["bytes"] // 2, "tensors": sender["tensors"],
                   "buckets": sender["buckets"], "bucket_MiB": sizes.bucket_bytes / 2**20,
                   "verified": receiver["verified"], **sync_summary(sender, receiver),
                   "seconds": {"sender": sender["seconds"], "receiver": receiver["seconds"]},
                   "measures": "bucketed: CollectiveTransport.send / receive into the engine's tensors; raw: "
                   "one torch.distributed.broadcast of as many bytes from the same device (raw_host: from "
                   "host memory); ratio = bucketed median s / raw median s"}
    if wire != "nccl":
        out["nccl"] = (f"not measured: {NEEDS_CUDA}" if not cuda else "not measured: one GPU, and NCCL "
                       "refuses two ranks on one device (nccl_same_gpu); a colocated engine syncs over gloo")
    return out


# -- the table's result column --------------------------------------------------------------------


def describe(name: str, r: Result) -> str | None:
    if name == "grpo_step":
        detail = ", ".join(f"{p} {r['phase_detail_s'][p]:.3f}" for p in PHASES)
        return (f"{r['rows']} rows, {r['rollout_tokens_per_s']:.0f} rollout tokens/s, "
                f"{r['samples_per_s']:.1f} samples/s, step {r['step_s']:.2f} s ({detail}); "
                f"synced {r['synced']}")
    if name == "weight_sync":
        rates = " ".join(f"{k} {v:.3g}" for k, v in r["GBps"].items())
        return (f"{r['wire']}, {r['bytes'] / GIB:.2f} GiB in {r['buckets']} buckets; GB/s: {rates}; bucketed "
                f"x{r['ratio']:.2f} the raw time; verified {r['verified']}")
    return None
