"""One actor train step on a CPU with each attention kernel transformers offers there: SDPA and eager.

    .venv/bin/python bench/cpu_attention.py [--sizes 11m,135m] [--new-tokens 32,128]
        [--lengths uniform] [--rounds 5] [--threads 2] [--out bench/out/cpu-attention-<UTC>/]

For each size and response length, one rank of the real trainer per kernel
(`training.rank.DeepSpeedRank` at world size 1, gloo, ZeRO 0, bf16 autocast as `precision: bf16`
on a CPU) runs `TrainerWorker.train`'s loop over one synthetic GRPO rollout (bench/packing.py's),
packed rows (padding auto). The ranks live side by side in one process and take turns, one step each
per round (alternating, so a busy machine slows them alike); medians over rounds. This is the
measurement behind `training.padding.training_attention`: eager on a CPU up to
`CPU_EAGER_MAX_TOKENS` tokens per sequence. SDPA's CPU flash kernel has the slower backward at these
lengths; eager materialises every head's [L, L] scores, which is why long sequences keep SDPA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import packing  # noqa: E402

# size -> (prompts per step, micro-batch rows); samples per prompt is 4.
SIZES: dict[str, tuple[int, int]] = {"11m": (8, 32), "135m": (4, 16)}
KERNELS = ("sdpa", "eager")


def run_case(size: str, new_tokens: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import deepspeed.comm
    from transformers import AutoModelForCausalLM

    from kuberlhf.api import RLHFJobSpec
    from kuberlhf_workers.training.batch import collate
    from kuberlhf_workers.training.experience import make_experience
    from kuberlhf_workers.training.layout import train_layout
    from kuberlhf_workers.training.objectives import PolicyObjective
    from kuberlhf_workers.training.rank import DeepSpeedRank

    prompts, micro = SIZES[size]
    path = packing.model_dir(size, workdir)
    result = packing.rollout(path, prompts, new_tokens, args.lengths)
    cpu, port = torch.device("cpu"), packing.free_port()
    spec = RLHFJobSpec.model_validate({
        "algorithm": "grpo", "precision": "bf16", "model": {"actor": str(path)},
        "reward": {"function": "x.py:f"}, "data": {"maxNewTokens": new_tokens},
        "rollout": {"samplesPerPrompt": 4, "promptsPerStep": prompts},
        "actor": {"microBatchSize": micro, "zeroStage": 0, "learningRate": 1e-7}, "kl": {"coef": 0.0},
    })
    batch = collate(result, 0)
    rewards = torch.randn(len(batch), generator=torch.Generator().manual_seed(1))
    runs: dict[str, Any] = {}
    for kernel in KERNELS:
        objective = PolicyObjective(spec)
        layout = train_layout(len(result), spec.actor, "actor")
        rank = DeepSpeedRank("actor", spec.actor, layout, 0, cpu, "bf16")
        # The second join finds the gloo world up (init_distributed is a no-op then).
        rank.join(("127.0.0.1", port), lambda k=kernel: AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch.float32, attn_implementation=k), 300)
        runs[kernel] = (rank.model, objective, make_experience(spec, batch, rewards, None, None))

    def step(kernel: str) -> float:
        engine, objective, exp = runs[kernel]
        start = time.perf_counter()
        for first in range(0, len(result), micro):
            loss, _ = objective.loss(engine, exp, slice(first, first + micro), cpu)
            engine.backward(loss)
            engine.step()
        return time.perf_counter() - start

    for kernel in KERNELS:  # warm-up
        step(kernel)
    times: dict[str, list[float]] = {k: [] for k in KERNELS}
    for r in range(args.rounds):
        for kernel in KERNELS if r % 2 == 0 else KERNELS[::-1]:
            times[kernel].append(step(kernel))
    deepspeed.comm.destroy_process_group()
    wall = {k: statistics.median(ts) for k, ts in times.items()}
    longest = max(len(p) + len(r) for p, r in zip(result.prompt_ids, result.response_ids, strict=True))
    print(f"{size} {new_tokens} new tokens: sdpa {wall['sdpa']:.3f} s, eager {wall['eager']:.3f} s",
          flush=True)
    return {"size": size, "new_tokens": new_tokens, "longest_sequence": longest, "rows": len(result),
            "wall_s": wall, "rounds": times, "eager_speedup": wall["sdpa"] / wall["eager"]}


def main() -> None:
    options = packing.parser(__doc__, ",".join(SIZES))
    options.add_argument("--new-tokens", default="32,128")
    options.add_argument("--lengths", default="uniform", choices=["uniform", "full"])
    args = options.parse_args()
    out, results = packing.results_dir("cpu-attention", args)
    results["cases"] = []
    for size in args.sizes.split(","):
        for new_tokens in (int(n) for n in args.new_tokens.split(",")):
            results["cases"].append(run_case(size, new_tokens, args, out))
            (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n{'size':6s} {'new tokens':>10s} {'longest':>8s} {'sdpa s':>8s} {'eager s':>8s} {'eager x':>8s}")
    for case in results["cases"]:
        wall = case["wall_s"]
        print(f"{case['size']:6s} {case['new_tokens']:10d} {case['longest_sequence']:8d} {wall['sdpa']:8.3f} "
              f"{wall['eager']:8.3f} {case['eager_speedup']:8.2f}")
    print(f"\nwrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
