"""One actor train step in fp32 against bf16 on this CPU, at three model sizes.

    .venv/bin/python bench/cpu_precision.py [--sizes tiny,11m,135m] [--rounds 5] [--threads 2]
        [--out bench/out/cpu-precision-<UTC>/]

For each size and precision, one rank of the real trainer (`training.rank.DeepSpeedRank` at world
size 1, gloo, ZeRO 0) runs `TrainerWorker.train`'s loop (PolicyObjective.loss, backward, optimizer
step, for every micro-batch) over one synthetic GRPO rollout (bench/packing.py's: the bench
prompts, 4 samples each, responses of 1-32 random tokens), with padding auto. bf16 on a CPU is an
fp32 module and optimizer under bf16 autocast (`DeepSpeedRank.autocast`). The two ranks of a size
live side by side in one process and take turns, one step each per round, so a busy machine slows
them alike; medians over rounds (wall and CPU seconds) and bf16's speed-up over fp32. This is the
measurement behind `precision: auto` staying fp32 on CPU (toy models) while the benchmark's
kuberlhf side asks for bf16 (bench/vs_trl.py).
"""

from __future__ import annotations

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
SIZES: dict[str, tuple[int, int]] = {"tiny": (8, 32), "11m": (8, 32), "135m": (4, 16)}
PRECISIONS = ("fp32", "bf16")
NEW_TOKENS = 32


def model_dir(size: str, workdir: Path) -> Path:
    if size == "tiny":
        from kuberlhf_workers.base.builtin import resolve_model

        return Path(resolve_model("builtin:tiny", field="model"))
    return packing.model_dir(size, workdir)


def run_size(size: str, rounds: int, workdir: Path) -> dict[str, Any]:
    import deepspeed.comm

    from kuberlhf.api import RLHFJobSpec
    from kuberlhf_workers.training.batch import collate
    from kuberlhf_workers.training.experience import make_experience
    from kuberlhf_workers.training.layout import train_layout
    from kuberlhf_workers.training.objectives import PolicyObjective
    from kuberlhf_workers.training.rank import DeepSpeedRank

    prompts, micro = SIZES[size]
    path = model_dir(size, workdir)
    result = packing.rollout(path, prompts, NEW_TOKENS, "uniform")
    cpu = torch.device("cpu")
    steps: dict[str, Any] = {}
    port = packing.free_port()
    for precision in PRECISIONS:
        spec = RLHFJobSpec.model_validate({
            "algorithm": "grpo", "precision": precision, "model": {"actor": str(path)},
            "reward": {"function": "x.py:f"}, "data": {"maxNewTokens": NEW_TOKENS},
            "rollout": {"samplesPerPrompt": 4, "promptsPerStep": prompts},
            "actor": {"microBatchSize": micro, "zeroStage": 0, "learningRate": 1e-7}, "kl": {"coef": 0.0},
        })
        objective = PolicyObjective(spec)
        rank = DeepSpeedRank("actor", spec.actor, train_layout(len(result), spec.actor, "actor"), 0, cpu,
                             precision)
        # The second join finds the gloo world up (init_distributed is a no-op then).
        rank.join(("127.0.0.1", port), lambda o=objective: o.build_model(str(path), 0), 300)
        batch = collate(result, 0)
        rewards = torch.randn(len(batch), generator=torch.Generator().manual_seed(1))
        steps[precision] = (rank.model, objective, make_experience(spec, batch, rewards, None, None))

    def step(precision: str) -> tuple[float, float]:
        engine, objective, exp = steps[precision]
        wall, cpu_s = time.perf_counter(), time.process_time()
        for first in range(0, len(result), micro):
            loss, _ = objective.loss(engine, exp, slice(first, first + micro), cpu)
            engine.backward(loss)
            engine.step()
        return time.perf_counter() - wall, time.process_time() - cpu_s

    for precision in PRECISIONS:  # warm-up: allocator, kernels, DeepSpeed's first step
        step(precision)
    times: dict[str, list[tuple[float, float]]] = {p: [] for p in PRECISIONS}
    for r in range(rounds):
        for precision in PRECISIONS if r % 2 == 0 else PRECISIONS[::-1]:
            times[precision].append(step(precision))
            print(f"{size} round {r} {precision}: wall {times[precision][-1][0]:.3f} s", flush=True)
    deepspeed.comm.destroy_process_group()
    wall = {p: statistics.median(t[0] for t in ts) for p, ts in times.items()}
    cpu_s = {p: statistics.median(t[1] for t in ts) for p, ts in times.items()}
    engine = steps["fp32"][0]
    return {"model": str(path), "parameters": sum(p.numel() for p in engine.module.parameters()),
            "rows": len(result), "micro": micro, "wall_s": wall, "cpu_s": cpu_s, "rounds": times,
            "bf16_speedup_wall": wall["fp32"] / wall["bf16"],
            "bf16_speedup_cpu": cpu_s["fp32"] / cpu_s["bf16"]}


def main() -> None:
    args = packing.parser(__doc__, ",".join(SIZES)).parse_args()
    out, results = packing.results_dir("cpu-precision", args)
    results["sizes"] = {}
    for size in args.sizes.split(","):
        results["sizes"][size] = run_size(size, args.rounds, out)
        (out / "results.json").write_text(json.dumps(results, indent=2))
    header = ("size", "params", "fp32 s", "bf16 s", "bf16 x wall", "bf16 x cpu")
    print("\n" + " ".join(f"{h:>11s}" if i else f"{h:6s}" for i, h in enumerate(header)))
    for size, res in results["sizes"].items():
        wall = res["wall_s"]
        print(f"{size:6s} {res['parameters'] / 1e6:10.1f}M {wall['fp32']:11.3f} {wall['bf16']:11.3f} "
              f"{res['bf16_speedup_wall']:11.2f} {res['bf16_speedup_cpu']:11.2f}")
    print(f"\nwrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
