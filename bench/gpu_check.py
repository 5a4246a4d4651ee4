"""Checks for the lent single-GPU machine, in one call: `make gpu-check OUT=$OUT` (bench/README.md).

That machine's python3 has torch and transformers but no DeepSpeed or pydantic, and downloads
nothing: those travel as wheels (`make gpu-wheels`), installed into a temporary folder first. Each
check runs in spawned processes under a deadline, so one that crashes or hangs (NCCL) is reported
and the rest run; a global budget skips what no longer fits. JSON is rewritten after every check.
`--cpu-smoke` runs the same code at toy sizes on CPU, with the CUDA-only checks skipped. The
throughput checks, last in the plan, are in gpu_throughput.py; what both use in gpu_common.py.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kuberlhf_workers.base.samples import GenerationResult

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # gpu_common, gpu_throughput (and bench/gpu.py's modules)
STARTED = time.monotonic()


def install_wheels(folder: Path) -> Result:
    """pip-install the carried wheels (no index) into a temp folder first on sys.path, if needed."""
    missing = [m for m in ("pydantic", "deepspeed") if importlib.util.find_spec(m) is None]
    wheels = sorted(folder.glob("*.whl"))
    if not missing or not wheels:
        return {"installed": False, "missing": missing, "wheels_found": len(wheels)}
    target, start = tempfile.mkdtemp(prefix="gpu-check-site-"), time.perf_counter()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--disable-pip-version-check", "--target", target, *map(str, wheels)],
                   check=True, env=os.environ | {"PIP_ROOT_USER_ACTION": "ignore"})
    sys.path.insert(0, target)  # spawned children get sys.path, other subprocesses PYTHONPATH
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (target, os.environ.get("PYTHONPATH")) if p)
    importlib.invalidate_caches()
    return {"installed": True, "target": target, "wheels": [w.name for w in wheels],
            "seconds": time.perf_counter() - start}


def _bootstrap() -> Result:
    """Runs before torch is imported, so that the carried wheels (typing_extensions too) win."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--wheels", type=Path, default=ROOT / ".gpu-wheels")
    try:
        return install_wheels(parser.parse_known_args()[0].wheels)
    except (OSError, subprocess.CalledProcessError) as exc:
        return {"installed": False, "error": f"{type(exc).__name__}: {exc}"}


WHEELS: Result = _bootstrap() if __name__ == "__main__" else {}

import gpu_throughput  # noqa: E402
import torch  # noqa: E402
from gpu_common import (  # noqa: E402
    GIB,
    NEEDS_CUDA,
    Result,
    Sizes,
    error_result,
    free_port,
    job_spec,
    llama_config,
    llama_state,
    rollout_model,
    spawn,
    sync_cuda,
    timed,
)

Check = tuple[str, float, float, Callable[[float], Result]]  # name, least and most seconds, the check

GPU = Sizes(
    llama={"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16,
           "num_attention_heads": 16, "vocab_size": 32000},  # 0.95B parameters
    hf_body={"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 12,  # 0.15B
             "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 64},
)
CPU = Sizes(
    llama={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 2, "vocab_size": 512},
    prompts=2, samples=2, prompt_tokens=8, new_tokens=8, micro=2, bucket_bytes=64 * 2**10,
    ipc_tensors=0, hf_rows=(2, 2, 8), hf_body={"hidden_size": 64, "intermediate_size": 128,
                                               "num_hidden_layers": 3, "num_attention_heads": 4,
                                               "num_key_value_heads": 4, "head_dim": 16},
    grpo_micro=2, grpo_steps=2, sync_repeats=2,
)


# -- the checks' child processes ------------------------------------------------------------------


def versions() -> Result:
    out: Result = {"ok": True, "python": sys.version.split()[0], "torch": torch.__version__,
                   "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    for name in ("transformers", "deepspeed", "pydantic", "accelerate", "peft", "triton"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    if torch.cuda.is_available():
        props, nccl = torch.cuda.get_device_properties(0), torch.cuda.nccl.version()
        out |= {"gpu": props.name, "gpu_memory_GiB": props.total_memory / GIB,
                "gpus": torch.cuda.device_count(), "capability": f"{props.major}.{props.minor}",
                "cudnn": torch.backends.cudnn.version(), "nccl": ".".join(map(str, nccl))}
    return out


def _ipc_tensor(i: int) -> torch.Tensor:
    """Deterministic bf16 on cuda:0: the engine regenerates it to check what it opened, bit for bit."""
    gen = torch.Generator(device="cuda").manual_seed(1000 + i)
    return torch.randn((8192, 8192), generator=gen, device="cuda", dtype=torch.bfloat16)


def ipc_trainer(handles: Any, done: Any, count: int) -> Result:
    from torch.multiprocessing.reductions import reduce_tensor

    tensors = [_ipc_tensor(i) for i in range(count)]
    torch.cuda.synchronize()
    handles.put((time.perf_counter(), [reduce_tensor(t) for t in tensors]))
    return {"ok": bool(done.get(timeout=300))}  # the memory must live until the engine lets go


def _ipc_open(handles: Any) -> Result:
    start, shared = handles.get(timeout=120)
    tensors = [rebuild(*args) for rebuild, args in shared]
    torch.cuda.synchronize()
    opened = time.perf_counter() - start
    own = [torch.empty_like(t) for t in tensors]  # what a colocated engine's load_weights fills
    copy_s = timed(lambda: [o.copy_(t) for o, t in zip(own, tensors, strict=True)], True, repeats=3)
    equal = all(torch.equal(t.view(torch.int16), _ipc_tensor(i).view(torch.int16))
                for i, t in enumerate(tensors))
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    return {"ok": equal, "bit_equal": equal, "tensors": len(tensors), "bytes": nbytes, "share_s": opened,
            "copy_s": copy_s, "copy_GBps": nbytes / copy_s / 1e9}


def ipc_engine(handles: Any, done: Any) -> Result:
    try:
        return _ipc_open(handles)  # its tensors are released when it returns, before the trainer hears
    finally:
        done.put(True)


def nccl_rank(rank: int, port: int) -> Result:
    import torch.distributed as dist

    torch.cuda.set_device(0)
    try:
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                timeout=timedelta(seconds=40), device_id=torch.device("cuda", 0))
        x = torch.full((1 << 20,), float(rank + 1), device="cuda")
        dist.broadcast(x, src=0)
        torch.cuda.synchronize()
        return {"ok": True, "refused": False, "received_ok": bool((x == 1).all())}
    except Exception as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [""]
        return {"ok": True, "refused": True, "error_first_line": f"{type(exc).__name__}: {lines[0]}",
                "detail": next((line for line in lines if "uplicate" in line), None)}


class _Wire:
    """The sync group's process group, stood in for: nothing moves (`payloads` None), or the sender
    records each broadcast and the receiver replays them (an in-memory loopback, to verify)."""

    def __init__(self, payloads: list[torch.Tensor] | None = None, record: bool = False) -> None:
        self.payloads, self.record = payloads, record

    def broadcast(self, tensor: torch.Tensor, src: int) -> _Wire:
        if self.payloads is not None and self.record:
            self.payloads.append(tensor.clone())
        elif self.payloads is not None:
            tensor.copy_(self.payloads.pop(0))
        return self

    def wait(self) -> None:
        return None


def bucket_check(sizes: Sizes, cuda: bool) -> Result:
    from kuberlhf_workers.base.transports import CollectiveTransport, param_meta, plan_buckets

    device = torch.device("cuda" if cuda else "cpu")
    src = llama_state(sizes, device)
    named, dst = dict(src), {n: torch.empty_like(t) for n, t in src}
    nbytes = sum(t.numel() * t.element_size() for _, t in src)
    plan = plan_buckets([param_meta(n, t) for n, t in src], sizes.bucket_bytes)

    def buckets() -> Iterator[list[tuple[str, torch.Tensor]]]:
        return ([(m.name, named[m.name]) for m in bucket] for bucket in plan)

    def load(items: Any) -> None:
        for name, tensor in items:
            dst[name].copy_(tensor)

    sink = types.SimpleNamespace(load_weights=load)  # the receiving engine

    def end(rank: int, wire: _Wire) -> CollectiveTransport:
        transport = CollectiveTransport("127.0.0.1", 0, rank, 2, "nccl" if cuda else "gloo", plan, 60.0)
        transport._group = wire
        return transport

    sender, receiver = end(0, _Wire()), end(1, _Wire())
    flat_src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    flat_dst = torch.empty_like(flat_src)
    median_s = {"raw": timed(lambda: flat_dst.copy_(flat_src), cuda),
                "per_tensor": timed(lambda: [dst[n].copy_(t) for n, t in src], cuda),
                "pack": timed(lambda: sender.send(buckets()), cuda),
                "unpack": timed(lambda: receiver.receive(None, sink), cuda)}
    median_s["bucketed"] = median_s["pack"] + median_s["unpack"]
    payloads: list[torch.Tensor] = []
    end(0, _Wire(payloads, record=True)).send(buckets())
    end(1, _Wire(payloads)).receive(None, sink)
    verified = all(torch.equal(dst[n].view(torch.int16), t.view(torch.int16)) for n, t in src)
    # send() skips the copy for a lone parameter already on the transport's device (as it compares it)
    lone = [b[0].name for b in plan if len(b) == 1 and named[b[0].name].device == sender.device]
    return {"ok": verified, "verified": verified, "parameters": nbytes // 2, "bytes": nbytes,
            "tensors": len(src), "buckets": len(plan), "bucket_MiB": sizes.bucket_bytes / 2**20,
            "lone_sent_without_copy": len(lone), "median_s": median_s,
            "GBps": {k: nbytes / s / 1e9 for k, s in median_s.items()},
            "measures": "one device, no wire. raw: one flat copy of all bytes; per_tensor: one copy per "
            "parameter; pack: CollectiveTransport.send's torch.cat into its reused buffers; unpack: "
            "receive's views and load's copies; bucketed: pack + unpack. GB/s: state bytes / median s"}


def synthetic_rollout(sizes: Sizes, vocab: int) -> GenerationResult:
    """Random tokens: full prompts, responses of random length (the first one full, so the batch is as
    wide as the spec allows), behaviour log-probs near what a random model gives (-log V)."""
    from kuberlhf_workers.base.samples import GenerationResult

    gen, rows, full = torch.Generator().manual_seed(0), sizes.prompts * sizes.samples, sizes.new_tokens
    lengths = [full, *torch.randint(full // 2, full + 1, (rows - 1,), generator=gen).tolist()]
    prompts = [torch.randint(3, vocab, (sizes.prompt_tokens,), generator=gen).tolist()
               for _ in range(sizes.prompts)]
    responses = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]
    logps = [(-math.log(vocab) + 0.1 * torch.randn(n, generator=gen)).tolist() for n in lengths]
    prompt_ids = [p for p in prompts for _ in range(sizes.samples)]
    return GenerationResult([""] * rows, [""] * rows, prompt_ids, responses, logps, [True] * rows)


def deepspeed_check(stage: int, sizes: Sizes, cuda: bool) -> Result:
    from transformers import LlamaForCausalLM

    from kuberlhf_workers.training.batch import collate
    from kuberlhf_workers.training.experience import make_experience
    from kuberlhf_workers.training.layout import train_layout
    from kuberlhf_workers.training.objectives import PolicyObjective
    from kuberlhf_workers.training.rank import DeepSpeedRank

    spec = job_spec(stage, sizes, cuda)
    device = torch.device("cuda" if cuda else "cpu")
    objective, rows = PolicyObjective(spec, device), sizes.prompts * sizes.samples
    layout = train_layout(rows, objective.trainer, "actor")
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(sizes.llama))  # fp32 on the host, as build_model loads it
    parameters = sum(p.numel() for p in model.parameters())
    rank = DeepSpeedRank("actor", objective.trainer, layout, 0, device)
    start = time.perf_counter()
    rank.join(("127.0.0.1", free_port()), lambda: model, timeout_s=120)  # with layout.deepspeed_config
    init_s = time.perf_counter() - start
    init_peak = (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()) if cuda else (0, 0)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    batch = collate(synthetic_rollout(sizes, sizes.llama["vocab_size"]), pad_id=0)
    rewards = torch.randn(rows, generator=torch.Generator().manual_seed(1))
    exp, engine = make_experience(spec, batch, rewards, None, None), rank.model
    step_s, losses = [], []
    for _ in range(sizes.steps):
        sync_cuda(cuda)
        start = time.perf_counter()
        for first in range(0, rows, layout.micro):  # TrainerWorker.train's loop, over the whole batch
            loss, _ = objective.loss(engine, exp, slice(first, first + layout.micro), device)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
        sync_cuda(cuda)
        step_s.append(time.perf_counter() - start)
    finite = all(math.isfinite(v) for v in losses)
    out: Result = {"ok": finite, "zero_stage": stage, "parameters": parameters, "rows": rows,
                   "tokens_per_row": batch.input_ids.shape[1], "micro": layout.micro,
                   "accumulation": layout.accumulation, "init_s": init_s, "step_s": step_s,
                   "steady_step_s": statistics.median(step_s[1:] or step_s), "loss_finite": finite,
                   "losses": losses, "dtype": str(next(engine.module.parameters()).dtype)}
    if cuda:
        free, total = torch.cuda.mem_get_info()
        steps_peak = torch.cuda.max_memory_allocated()
        out |= {"peak_allocated": max(init_peak[0], steps_peak), "init_peak_allocated": init_peak[0],
                "steps_peak_allocated": steps_peak,
                "peak_reserved": max(init_peak[1], torch.cuda.max_memory_reserved()),
                "context_bytes": total - free - torch.cuda.memory_reserved()}  # context, cuBLAS, NCCL
    return out


def hf_check(sizes: Sizes, cuda: bool, workdir: str) -> Result:
    from kuberlhf_workers.base.samples import GenerationRequest
    from kuberlhf_workers.rollout.hf import HFBackend

    path = rollout_model(sizes, workdir)
    start = time.perf_counter()
    backend = HFBackend(path, torch.device("cuda" if cuda else "cpu"))
    load_s = time.perf_counter() - start
    prompts, samples, new_tokens = sizes.hf_rows
    request = GenerationRequest([f"What is {i} + {2 * i + 1}?" for i in range(prompts)], samples, new_tokens)
    backend.generate(request)  # warm-up
    sync_cuda(cuda)
    start = time.perf_counter()
    result = backend.generate(replace(request, seed=1))
    sync_cuda(cuda)
    seconds, tokens = time.perf_counter() - start, sum(len(r) for r in result.response_ids)
    finite = all(math.isfinite(v) for row in result.response_logprobs for v in row)
    return {"ok": finite and tokens > 0, "rows": len(result), "tokens": tokens, "generate_s": seconds,
            "tokens_per_s": tokens / seconds, "load_s": load_s, "logprobs_finite": finite,
            "finished_rows": sum(result.finished), "dtype": str(next(backend.model.parameters()).dtype),
            "parameters": sum(p.numel() for p in backend.model.parameters())}


# -- the checks as the parent runs them -----------------------------------------------------------


def check_ipc(sizes: Sizes, cuda: bool, timeout: float) -> Result:
    if not cuda:
        return {"ok": False, "skipped": f"{NEEDS_CUDA}: CUDA IPC shares device memory between processes"}
    ctx = mp.get_context("spawn")
    handles, done = ctx.Queue(), ctx.Queue()
    jobs: list[tuple[Callable[..., Result], tuple[Any, ...]]] = [
        (ipc_trainer, (handles, done, sizes.ipc_tensors)), (ipc_engine, (handles, done))]
    trainer, engine = spawn(jobs, timeout)
    return engine | {"ok": bool(trainer.get("ok") and engine.get("ok")), "trainer": trainer}


def check_nccl(cuda: bool, timeout: float) -> Result:
    if not cuda:
        return {"ok": False, "skipped": f"{NEEDS_CUDA}: two NCCL ranks on one GPU"}
    port = free_port()
    ranks = spawn([(nccl_rank, (0, port)), (nccl_rank, (1, port))], min(timeout, 60.0))
    refused = [r for r in ranks if r.get("refused")]
    if not refused and not all("refused" in r for r in ranks):
        errors = "; ".join(r.get("error", "") for r in ranks)
        return {"ok": False, "refused": None, "ranks": ranks, "error": f"a rank hung or crashed: {errors}"}
    return {"ok": True, "refused": bool(refused), "ranks": ranks,
            "error_first_line": refused[0]["error_first_line"] if refused else None,
            "detail": next((r["detail"] for r in refused if r.get("detail")), None)}


def check_memory(sizes: Sizes, cuda: bool, runs: dict[int, Result]) -> Result:
    from kuberlhf import memory
    from kuberlhf.modelsize import ModelShape, parameters_of

    body = sizes.llama
    shape = ModelShape(parameters_of(body), "config", body["hidden_size"], body["num_hidden_layers"],
                       body["vocab_size"])
    out: Result = {"ok": True, "planned_parameters": shape.parameters}
    for stage in (2, 3):
        run, spec = runs.get(stage, {}), job_spec(stage, sizes, cuda)
        est = memory.trainer_estimate(spec, spec.actor, shape)
        row: Result = {"estimate_GiB": est.gib(), "parts_GiB": {k: v / GIB for k, v in est.parts.items()}}
        if run.get("peak_allocated"):
            device = run["peak_reserved"] + run["context_bytes"]
            row |= {"peak_allocated_GiB": run["peak_allocated"] / GIB, "device_peak_GiB": device / GIB,
                    "ratio_allocated": (est.total - est.parts["overhead"]) / run["peak_allocated"],
                    "ratio_device": est.total / device}
        out[f"zero{stage}"] = row
    if not cuda:
        return out | {"ok": False, "skipped": f"{NEEDS_CUDA}: no GPU peak to compare with; estimates only"}
    ratios = [out[f"zero{s}"].get("ratio_allocated") for s in (2, 3)]
    if None in ratios:
        return out | {"ok": False, "error": "no measured peak: a DeepSpeed check failed or was skipped"}
    return out | {"within_25pct": all(abs(r - 1) <= 0.25 for r in ratios)}


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def describe(name: str, r: Result) -> str:
    """The table's result column."""
    if r.get("skipped") or r.get("error"):
        return str(r.get("skipped") or r.get("error"))
    if (line := gpu_throughput.describe(name, r)) is not None:
        return line
    if name == "versions":
        return (f"{r.get('gpu', 'no GPU')}, {r.get('gpu_memory_GiB', 0):.0f} GiB; torch {r['torch']} "
                f"(CUDA {r['cuda']}), transformers {r['transformers']}, deepspeed {r['deepspeed']}")
    if name == "cuda_ipc":
        return (f"{r['bytes'] / GIB:.2f} GiB in {r['tensors']} tensors opened in {r['share_s']:.3f} s, "
                f"bit-equal {r['bit_equal']}; engine copy {r['copy_GBps']:.0f} GB/s")
    if name == "nccl_same_gpu":
        return f"refused: {r['error_first_line']} {r['detail'] or ''}" if r["refused"] else "NOT refused"
    if name == "bucket_pack":
        rates = " ".join(f"{k} {v:.4g}" for k, v in r["GBps"].items())
        return (f"{_count(r['parameters'])} bf16, {r['tensors']} tensors, {r['buckets']} buckets; GB/s: "
                f"{rates}; verified {r['verified']}")
    if name.startswith("deepspeed"):
        peak = f", peak {r['peak_allocated'] / GIB:.1f} GiB allocated" if "peak_allocated" in r else ""
        steps = " ".join(f"{s:.3f}" for s in r["step_s"])
        return f"{_count(r['parameters'])}, s/step {steps}, loss finite {r['loss_finite']}{peak}"
    if name == "memory_estimate":
        rows = [f"{k}: estimate {v['estimate_GiB']:.1f} GiB / peak {v['peak_allocated_GiB']:.1f} "
                f"(x{v['ratio_allocated']:.2f}; device x{v['ratio_device']:.2f})"
                for k, v in r.items() if k.startswith("zero")]
        return "; ".join(rows) + f"; within 25 %: {r['within_25pct']}"
    if name == "hf_rollout":
        return (f"{r['rows']} rows, {r['tokens']} tokens in {r['generate_s']:.2f} s: {r['tokens_per_s']:.0f} "
                f"tokens/s ({_count(r['parameters'])} {r['dtype']}); log-probs finite {r['logprobs_finite']}")
    return ""


def run_checks(plan: list[Check], only: set[str] | None, budget: float, summary: Result, out: Path) -> None:
    """Each check in turn with what is left of the budget (counted from the script's start); the JSON
    rewritten and a table row printed after each."""
    for name, least, most, check in plan:
        if only is not None and name not in only:
            continue
        began, left = time.monotonic(), budget - (time.monotonic() - STARTED)
        try:
            result = check(min(most, left)) if left >= least else {
                "ok": False, "skipped": f"time budget spent ({left:.0f} of {budget:.0f} s left)"}
        except Exception as exc:
            result = error_result(exc)
        result["wall_s"] = time.monotonic() - began
        summary["checks"][name], summary["seconds"] = result, time.monotonic() - STARTED
        out.write_text(json.dumps(summary, indent=2, default=str))
        status = "skipped" if result.get("skipped") else "ok" if result.get("ok") else "FAILED"
        try:
            line = describe(name, result)
        except (KeyError, TypeError, ValueError) as exc:
            line = f"(no summary: {exc!r}; see the JSON)"
        print(f"{name:<16} {status:<8} {result['wall_s']:>7.1f}  {line}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="toy sizes on CPU; CUDA-only checks skipped")
    parser.add_argument("--out", type=Path, help="JSON file, or a folder for gpu-check.json (default: $OUT)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for all the checks together")
    parser.add_argument("--wheels", type=Path, default=ROOT / ".gpu-wheels", help="read before torch loads")
    parser.add_argument("--only", help="comma-separated check names")
    args = parser.parse_args(argv)
    out = args.out or Path(os.environ.get("OUT") or ROOT / "bench" / "out")
    out = out if out.suffix == ".json" else out / "gpu-check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cuda = not args.cpu_smoke
    if args.cpu_smoke:
        os.environ.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")  # for every child
    elif not torch.cuda.is_available():
        print("no CUDA device here: run with --cpu-smoke", file=sys.stderr)
        return 2
    sizes, workdir, ds = (GPU if cuda else CPU), tempfile.mkdtemp(prefix="gpu-check-"), {}
    summary: Result = {"mode": "gpu" if cuda else "cpu-smoke", "started": datetime.now(UTC).isoformat(),
                       "budget_s": args.budget, "wheels": WHEELS, "seconds": 0.0, "checks": {}}

    def deepspeed(stage: int, timeout: float) -> Result:
        ds[stage] = spawn([(deepspeed_check, (stage, sizes, cuda))], timeout)[0]
        return ds[stage]

    # name, the least seconds worth starting it with, the most it may take, the check given its timeout
    plan: list[Check] = [
        ("versions", 10, 60, lambda t: spawn([(versions, ())], t)[0]),
        ("cuda_ipc", 30, 120, lambda t: check_ipc(sizes, cuda, t)),
        ("nccl_same_gpu", 30, 75, lambda t: check_nccl(cuda, t)),
        ("bucket_pack", 30, 120, lambda t: spawn([(bucket_check, (sizes, cuda))], t)[0]),
        ("hf_rollout", 40, 150, lambda t: spawn([(hf_check, (sizes, cuda, workdir))], t)[0]),
        ("deepspeed_zero2", 60, 200, lambda t: deepspeed(2, t)),
        ("deepspeed_zero3", 60, 200, lambda t: deepspeed(3, t)),
        ("memory_estimate", 1, 30, lambda t: check_memory(sizes, cuda, ds)),
        ("weight_sync", 30, 120, lambda t: gpu_throughput.check_weight_sync(sizes, cuda, t)),
        ("grpo_step", 60, 150, lambda t: gpu_throughput.check_grpo(sizes, cuda, workdir, t)),
    ]
    only = set(args.only.split(",")) if args.only else None
    print(f"{'check':<16} {'status':<8} {'wall s':>7}  result", flush=True)
    try:
        run_checks(plan, only, args.budget, summary, out)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"total {summary['seconds']:.1f} s; JSON: {out}")
    return 1 if any(not r.get("ok") and not r.get("skipped") for r in summary["checks"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
