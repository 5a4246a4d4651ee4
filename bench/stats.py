"""Turning what each system recorded into the same per-step rows and summary numbers.

Pure functions: inputs are the parsed step records plus wall-clock times the parent took, so
both systems are summarised by one definition of startup, steady state and phase split.
"""

from __future__ import annotations

import statistics
from typing import Any

# Summary fields compared as kuberlhf / TRL; for samples/s higher is better, for the rest lower.
# The reward "after the same steps": the mean of the last few steps' rewards (one step's mean over
# 32 samples is noisy).
TAIL_STEPS = 3
COMPARED = ("startup_s", "steady_samples_per_s", "steady_step_s", "peak_rss_mib", "wall_s")


def kuberlhf_steps(
    metrics: list[dict[str, Any]], arrivals: list[float], started: float, samples_per_step: int
) -> list[dict[str, Any]]:
    """Rows from metrics.jsonl. The file has no timestamps, so a step's end is when the parent saw
    its line appear (polled, see vs_trl.py) and its length is samples / samples_per_second, which
    the driver measures around the step itself (rollout + reward + train + sync)."""
    if len(arrivals) < len(metrics):
        raise ValueError(f"{len(metrics)} metrics lines but only {len(arrivals)} arrival times")
    rows = []
    for line, seen in zip(metrics, arrivals, strict=False):
        rows.append(
            {
                "step": int(line["step"]),
                "reward_mean": line["reward_mean"],
                "t_end_s": seen - started,
                "step_s": samples_per_step / line["samples_per_second"],
                "response_length_mean": line.get("response_length_mean"),
                "phases_s": {
                    phase: line[f"time_{phase}_s"] for phase in ("rollout", "reward", "train", "sync")
                },
            }
        )
    return rows


def trl_steps(records: list[dict[str, Any]], started: float) -> list[dict[str, Any]]:
    """Rows from trl_side.py's trl_steps.jsonl (timestamps taken inside the TRL process)."""
    return [
        {
            "step": int(r["step"]),
            "reward_mean": r["reward_mean"],
            "t_end_s": r["t_end"] - started,
            "step_s": r["t_end"] - r["t_begin"],
            "response_length_mean": r.get("response_length_mean"),
            "phases_s": {
                "generate": r["time_generate_s"],
                "reward": r["time_reward_s"],
                "train": r["time_train_s"],
            },
        }
        for r in records
    ]


def summarise(
    rows: list[dict[str, Any]], wall_s: float, peak_rss_bytes: int, samples_per_step: int, warmup: int
) -> dict[str, Any]:
    """Startup = process start until the first step began; steady state leaves out the first
    `warmup` steps (lazy initialisation, allocator growth), unless nothing would be left."""
    summary: dict[str, Any] = {
        "steps_done": len(rows),
        "wall_s": wall_s,
        "peak_rss_mib": peak_rss_bytes / 2**20,
        "reward_curve": [r["reward_mean"] for r in rows],
        "steps": rows,
    }
    if not rows:
        return summary
    steady = rows[warmup:] if len(rows) > warmup else rows
    seconds = sum(r["step_s"] for r in steady)
    phases = sorted({p for r in steady for p in r["phases_s"]})
    summary.update(
        startup_s=rows[0]["t_end_s"] - rows[0]["step_s"],
        steady_state_steps=[r["step"] for r in steady],
        steady_state_excludes_warmup=len(rows) > warmup,
        steady_samples_per_s=samples_per_step * len(steady) / seconds,
        steady_step_s=seconds / len(steady),
        steady_phases_s={p: sum(r["phases_s"].get(p, 0.0) for r in steady) / len(steady) for p in phases},
        reward_first=rows[0]["reward_mean"],
        reward_last=rows[-1]["reward_mean"],
        reward_tail_mean=statistics.fmean(r["reward_mean"] for r in rows[-TAIL_STEPS:]),
    )
    lengths = [r["response_length_mean"] for r in steady if r.get("response_length_mean") is not None]
    if len(lengths) == len(steady):
        summary["steady_response_tokens_mean"] = statistics.fmean(lengths)
    return summary


def model_flops_per_sample(matmul_parameters: int, prompt_tokens: float, response_tokens: float) -> float:
    """The model FLOPs one GRPO sample costs, the same definition for every system: a forward to
    prefill and generate it (2 per matmul weight per token) and the training forward and backward
    over the whole sequence (6 per weight per token). Attention-score FLOPs are left out (sequences
    here are under 100 tokens, a few percent of the total); so are recomputations a system chooses
    to do (an extra log-prob forward, activation checkpointing), which makes this "model FLOPs"."""
    return 8.0 * matmul_parameters * (prompt_tokens + response_tokens)


def mfu(summary: dict[str, Any], matmul_parameters: int, prompt_tokens: float, samples_per_step: int,
        peaks_gflops: dict[str, float]) -> dict[str, float] | None:
    """Model FLOPs per second over the steady steps, and that as a share of each measured matmul
    peak (`mfu_fp32`, `mfu_bf16`); None without steady steps or response lengths."""
    response = summary.get("steady_response_tokens_mean")
    step_s = summary.get("steady_step_s")
    if response is None or not step_s:
        return None
    rate = model_flops_per_sample(matmul_parameters, prompt_tokens, response) * samples_per_step / step_s
    out = {"model_gflops_per_s": rate / 1e9}
    for name, peak in peaks_gflops.items():
        out[f"mfu_{name}"] = rate / 1e9 / peak
    return out


def ratios(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, float | None]:
    """kuberlhf / TRL for each compared field (None where either side lacks it or TRL's is 0)."""
    out: dict[str, float | None] = {}
    for key in COMPARED:
        a, b = ours.get(key), theirs.get(key)
        out[key] = a / b if isinstance(a, int | float) and isinstance(b, int | float) and b else None
    return out


def combine_rounds(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """One system's rounds as one summary: the median of every timing (steady phases included),
    the worst exit code, and the first round's steps and reward curve (the runs are seeded, so
    every round learns alike; each round's own numbers stay under `rounds`)."""
    combined = dict(summaries[0])
    for key in (*COMPARED, "weights_relative_change", "reward_tail_mean", "steady_response_tokens_mean"):
        values = [s[key] for s in summaries if isinstance(s.get(key), int | float)]
        combined[key] = statistics.median(values) if values else None
    phases = {p for s in summaries for p in s.get("steady_phases_s", {})}
    combined["steady_phases_s"] = {
        p: statistics.median(s["steady_phases_s"][p] for s in summaries if p in s.get("steady_phases_s", {}))
        for p in sorted(phases)
    }
    combined["exit_code"] = next((s["exit_code"] for s in summaries if s.get("exit_code")), 0)
    combined["steps_done"] = min(s.get("steps_done", 0) for s in summaries)
    combined["rounds"] = [{k: v for k, v in s.items() if k != "steps"} for s in summaries]
    return combined
