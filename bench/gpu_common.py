"""What bench/gpu_check.py and its throughput checks (bench/gpu_throughput.py) share: the sizes,
the spawned-process plumbing, timing, and the models and specs the checks build.

Imported only after gpu_check has put the carried wheels on sys.path (it imports torch, and the
specs need pydantic).
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import socket
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from kuberlhf.api import RLHFJobSpec

GIB = 2**30
NEEDS_CUDA = "needs CUDA"
Result = dict[str, Any]


@dataclass(frozen=True)
class Sizes:
    llama: dict[str, Any]  # the model DeepSpeed trains, and the state the bucket and sync checks move
    prompts: int = 4
    samples: int = 4
    prompt_tokens: int = 128
    new_tokens: int = 384
    micro: int = 4
    steps: int = 3
    bucket_bytes: int = 64 * 2**20  # spec.weightSync.bucketMB's default
    ipc_tensors: int = 8  # 8192 x 8192 bf16, 128 MiB each
    hf_body: dict[str, Any] | None = None  # the rollout model's body (builtin:tiny's vocabulary)
    hf_rows: tuple[int, int, int] = (32, 4, 128)  # prompts, samples per prompt, new tokens
    grpo_micro: int = 16  # the GRPO step's micro-batch (its rows are hf_rows')
    grpo_steps: int = 3  # the first is the warm-up, left out of the steady numbers
    sync_repeats: int = 3  # timed syncs per mode after one untimed


def error_result(exc: BaseException) -> Result:
    first = (str(exc).strip().splitlines() or [""])[0]
    return {"ok": False, "error": f"{type(exc).__name__}: {first}",
            "traceback": traceback.format_exc().strip().splitlines()[-6:]}


def _child(fn: Callable[..., Result], args: tuple[Any, ...], index: int, results: Any) -> None:
    try:
        result = fn(*args)
    except BaseException as exc:  # reported to the parent, which decides
        result = error_result(exc)
    results.put((index, result))


def spawn(jobs: list[tuple[Callable[..., Result], tuple[Any, ...]]], timeout: float) -> list[Result]:
    """Each job in its own spawned process; one without a result by `timeout` is killed, reported."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(fn, args, i, results)) for i, (fn, args) in enumerate(jobs)]
    for p in procs:
        p.start()
    out: dict[int, Result] = {}
    deadline = time.monotonic() + timeout
    while len(out) < len(jobs) and time.monotonic() < deadline:
        try:
            index, result = results.get(timeout=0.5)
            out[index] = result
        except queue.Empty:
            if not any(p.is_alive() for p in procs) and results.empty():
                break
    for i, p in enumerate(procs):
        p.join(timeout=5 if i in out else 0.1)  # a process that answered may still be exiting
        if p.is_alive():
            p.kill()
            p.join()
    def lost(p: Any) -> Result:
        return {"ok": False, "error": f"no result: killed after {timeout:.0f} s" if p.exitcode == -9
                else f"no result: the process exited with code {p.exitcode}"}

    return [out.get(i) or lost(p) for i, p in enumerate(procs)]


def sync_cuda(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], cuda: bool, repeats: int = 5) -> float:
    """Median seconds of `repeats` calls after one untimed call, synchronized around each."""
    fn()
    times = []
    for _ in range(repeats):
        sync_cuda(cuda)
        start = time.perf_counter()
        fn()
        sync_cuda(cuda)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def llama_config(body: dict[str, Any]) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**body, num_key_value_heads=body["num_attention_heads"], tie_word_embeddings=False)


def llama_state(sizes: Sizes, device: torch.device, seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    """The trained Llama's parameters as random bf16 tensors, in the model's order (no model built:
    the shapes come from a meta-device one); the same `seed` gives the same tensors."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        shapes = [(n, p.shape) for n, p in LlamaForCausalLM(llama_config(sizes.llama)).named_parameters()]
    torch.manual_seed(seed)
    return [(n, torch.randn(s, dtype=torch.bfloat16, device=device)) for n, s in shapes]


def job_spec(stage: int, sizes: Sizes, cuda: bool) -> RLHFJobSpec:
    from kuberlhf.api import API_VERSION, KIND, parse_job

    spec = {"model": {"actor": "gpu-check-llama"}, "reward": {"function": "gpu_check.py:reward"},
            "data": {"maxPromptTokens": sizes.prompt_tokens, "maxNewTokens": sizes.new_tokens},
            "rollout": {"promptsPerStep": sizes.prompts, "samplesPerPrompt": sizes.samples},
            "actor": {"zeroStage": stage, "microBatchSize": sizes.micro, "learningRate": 1e-5,
                      "resources": {"gpus": int(cuda)}}}
    job = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": "gpu-check"}, "spec": spec}
    return parse_job(job).spec


def rollout_model(sizes: Sizes, workdir: str) -> Path:
    """builtin:tiny, or with `sizes.hf_body` a larger random Llama with its tokenizer, built once in
    `workdir` (hf_rollout builds it, grpo_step reuses it)."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from kuberlhf_workers.base.builtin import resolve_model

    path = resolve_model("builtin:tiny", cache_dir=Path(workdir) / "models")
    if sizes.hf_body is None:
        return path
    dest = Path(workdir) / "hf-model"
    if not (dest / "tokenizer_config.json").is_file():  # written last: a build cut short is redone
        config = AutoConfig.from_pretrained(path)
        config.update(sizes.hf_body)
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(dest)
        AutoTokenizer.from_pretrained(path).save_pretrained(dest)
    return dest
