"""Trainer / rollout-engine log-prob mismatch at the first micro-batch, per engine and precision.

    .venv/bin/python bench/precision_mismatch.py [--model builtin:tiny] [--engines hf,vllm]
        [--pairs bf16/bf16,fp32/fp32] [--out mismatch.json]

A pair is rollout/trainer precision. For each engine and pair: the real rollout backend
(`rollout.backend.make_backend`, in a child process: vLLM sets up its own torch.distributed world)
samples one step of the toy prompts; then a one-rank DeepSpeed world (`training.rank.DeepSpeedRank`,
gloo) loads the same checkpoint with the spec's precision and computes the trainer's log-probs of
the first micro-batch (`PolicyObjective.old_logprobs`, the pass a rollout correction makes). At step 1
of synchronous training these are the PPO ratio's numerator and denominator, so a ratio far from 1 is
clipping that no update caused. Prints and writes, per case, the mean and max absolute per-token
difference, the mean ratio exp(trainer - rollout) over response tokens, its largest deviation from
1 and the share of tokens outside PPO's default clip range.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def job_spec(model: str, engine: str, precision: str, micro: int) -> Any:
    from kuberlhf.api import RLHFJobSpec

    return RLHFJobSpec.model_validate({
        "model": {"actor": model},
        "reward": {"function": "x.py:f"},
        "data": {"prompts": "builtin:toy", "maxNewTokens": 32},
        "rollout": {"engine": engine, "samplesPerPrompt": 4, "promptsPerStep": 8},
        "actor": {"microBatchSize": micro, "zeroStage": 2},
        "precision": precision,
    })


def rollout(model: str, engine: str, precision: str, out: str) -> None:
    """Child process: one step of rollouts with the real backend, pickled to `out`."""
    import torch

    from kuberlhf_workers.base.builtin import resolve_model
    from kuberlhf_workers.base.data import load_prompts
    from kuberlhf_workers.base.samples import GenerationRequest
    from kuberlhf_workers.rollout.backend import make_backend

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    spec = job_spec(model, engine, precision, 4)
    backend = make_backend(spec, resolve_model(model, field="model"), torch.device("cpu"))
    records = load_prompts(spec.data, ROOT, None)[: spec.rollout.prompts_per_step]
    request = GenerationRequest(
        [r["prompt"] for r in records], spec.rollout.samples_per_prompt, spec.data.max_new_tokens, seed=1
    )
    result = backend.generate(request)
    Path(out).write_bytes(pickle.dumps(result))


def mismatch(
    model: str, engine: str, rollout_precision: str, trainer_precision: str, micro: int
) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from kuberlhf_workers.base.builtin import resolve_model
    from kuberlhf_workers.training.batch import collate
    from kuberlhf_workers.training.experience import Experience
    from kuberlhf_workers.training.layout import train_layout
    from kuberlhf_workers.training.objectives import PolicyObjective
    from kuberlhf_workers.training.rank import DeepSpeedRank

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rollout.pkl")
        subprocess.run(
            [sys.executable, __file__, "--rollout", model, engine, rollout_precision, out], check=True
        )
        result = pickle.loads(Path(out).read_bytes())
    path = str(resolve_model(model, field="model"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = collate(result, pad)
    spec = job_spec(model, engine, trainer_precision, micro)
    objective = PolicyObjective(spec)
    rank = DeepSpeedRank("actor", spec.actor, train_layout(len(batch), spec.actor, "actor"), 0,
                         torch.device("cpu"), spec.precision)
    rank.join(("127.0.0.1", free_port()), lambda: objective.build_model(path, pad), 300)
    zeros = torch.zeros_like(batch.response_mask)
    exp = Experience(batch, torch.zeros(len(batch)), zeros, None, None, zeros, None)
    rows = slice(0, micro)
    rank.model.eval()
    trainer = objective.old_logprobs(rank.model, exp, rows, torch.device("cpu"))
    mask = batch.response_mask[rows].bool()
    diff = (trainer - batch.behaviour_logp[rows])[mask]
    import deepspeed.comm

    deepspeed.comm.destroy_process_group()
    return {
        "engine": engine,
        "rollout": rollout_precision,
        "trainer": trainer_precision,
        "param_dtype": str(next(rank.model.module.parameters()).dtype),
        "tokens": int(mask.sum()),
        "mean_abs_diff": float(diff.abs().mean()),
        "max_abs_diff": float(diff.abs().max()),
        "mean_ratio": float(diff.exp().mean()),
        "max_ratio_dev": float((diff.exp() - 1).abs().max()),
        # Tokens PPO's default clip range (0.2) would clip at step 1 although no update happened.
        "outside_clip_share": float(((diff.exp() - 1).abs() > 0.2).float().mean()),
    }


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    if sys.argv[1:2] == ["--rollout"]:
        rollout(*sys.argv[2:6])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:tiny")
    parser.add_argument("--engines", default="hf,vllm")
    parser.add_argument("--pairs", default="fp32/fp32,bf16/bf16,bf16/fp32")
    parser.add_argument("--micro", type=int, default=8, help="rows in the first micro-batch")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    results = []
    for engine in args.engines.split(","):
        for pair in args.pairs.split(","):
            rollout_precision, trainer_precision = pair.split("/")
            r = mismatch(args.model, engine, rollout_precision, trainer_precision, args.micro)
            print(json.dumps(r), flush=True)
            results.append(r)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
