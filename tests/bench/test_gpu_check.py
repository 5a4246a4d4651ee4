"""bench/gpu_check.py: its CPU smoke run end to end (every check runs or says why not), and the
summaries of GPU-shaped results, so the one call on the lent GPU machine does not trip on them."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench import gpu_check  # noqa: E402

gpu_throughput = gpu_check.gpu_throughput  # bench/gpu_throughput.py, as gpu_check imports it

CHECKS = ["versions", "cuda_ipc", "nccl_same_gpu", "bucket_pack", "hf_rollout", "deepspeed_zero2",
          "deepspeed_zero3", "memory_estimate", "weight_sync", "grpo_step"]
CUDA_ONLY = {"cuda_ipc", "nccl_same_gpu", "memory_estimate"}


def _numbers(value: Any) -> Iterator[float]:
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield float(value)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cpu_smoke_runs_every_check_or_says_it_needs_cuda(tmp_path: Path) -> None:
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in (".", "operator", "workers")),
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
    }
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu-smoke", "--out",
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    summary = json.loads((tmp_path / "gpu-check.json").read_text())
    assert summary["mode"] == "cpu-smoke"
    assert list(summary["checks"]) == CHECKS
    for name, result in summary["checks"].items():
        assert name in proc.stdout
        if name in CUDA_ONLY:
            assert "needs CUDA" in result["skipped"], result
        else:
            assert result["ok"] is True and "skipped" not in result, result
            assert all(math.isfinite(x) for x in _numbers(result)), result
    for stage in (2, 3):
        run = summary["checks"][f"deepspeed_zero{stage}"]
        assert len(run["step_s"]) == 3 and run["loss_finite"]
        assert summary["checks"]["memory_estimate"][f"zero{stage}"]["estimate_GiB"] > 0
        assert summary["checks"]["memory_estimate"]["planned_parameters"] == run["parameters"]
    assert summary["checks"]["bucket_pack"]["verified"]
    assert summary["checks"]["hf_rollout"]["logprobs_finite"]
    _check_weight_sync(summary["checks"]["weight_sync"])
    _check_grpo_step(summary["checks"]["grpo_step"])


def _check_weight_sync(sync: dict[str, Any]) -> None:
    """gloo on CPU (NCCL named as not measured); the medians are the slower end's rounds, the GB/s
    and the ratio come from them."""
    assert sync["wire"] == "gloo" and "needs CUDA" in sync["nccl"] and sync["verified"]
    ends = sync["seconds"]
    for mode in ("bucketed", "raw"):
        rounds = [max(a, b) for a, b in zip(ends["sender"][mode], ends["receiver"][mode], strict=True)]
        assert len(rounds) == gpu_check.CPU.sync_repeats and min(rounds) > 0
        assert sync["median_s"][mode] == pytest.approx(statistics.median(rounds))
        assert sync["GBps"][mode] == pytest.approx(sync["bytes"] / sync["median_s"][mode] / 1e9)
        assert sync["GBps"][mode] > 0
    assert sync["ratio"] == pytest.approx(sync["median_s"]["bucketed"] / sync["median_s"]["raw"])


def _check_grpo_step(grpo: dict[str, Any]) -> None:
    """Every phase took time; training changed the weights and the sync gave them to the engine."""
    assert grpo["synced"] and grpo["loss_finite"] and grpo["steps_measured"] == gpu_check.CPU.grpo_steps - 1
    assert set(grpo["phase_detail_s"]) == set(gpu_throughput.PHASES)
    assert all(s > 0 for s in grpo["phase_detail_s"].values()), grpo["phase_detail_s"]
    last = grpo["steps"][-1]
    assert last["stale_before_sync"] > 0 and last["stale_after_sync"] == 0
    assert grpo["rollout_tokens_per_s"] == pytest.approx(last["tokens"] / last["phases_s"]["generate"])
    assert grpo["step_s"] == pytest.approx(sum(last["phases_s"].values()))
    train = sum(last["phases_s"][p] for p in gpu_throughput.TRAIN_PHASES)
    assert grpo["phases_s"]["train"] == pytest.approx(train)


def _gpu_results() -> dict[str, dict[str, Any]]:
    """Results shaped as the GPU run writes them (numbers made up)."""
    ds = {"ok": True, "parameters": 953_223_168, "step_s": [1.2, 0.4, 0.4], "loss_finite": True,
          "peak_allocated": 20 * 2**30, "peak_reserved": 22 * 2**30, "context_bytes": 2**29}
    return {
        "versions": {"ok": True, "gpu": "NVIDIA H200", "gpu_memory_GiB": 139.8, "torch": "2.11.0",
                     "cuda": "13.0", "transformers": "5.17.0", "deepspeed": "0.19.8"},
        "cuda_ipc": {"ok": True, "bytes": 2**30, "tensors": 8, "share_s": 0.05, "bit_equal": True,
                     "copy_GBps": 1900.0},
        "nccl_same_gpu": {"ok": True, "refused": True, "error_first_line": "DistBackendError: NCCL error",
                          "detail": "Duplicate GPU detected"},
        "bucket_pack": {"ok": True, "parameters": 953_223_168, "tensors": 147, "buckets": 33,
                        "verified": True, "GBps": {"raw": 1500.0, "per_tensor": 1400.0, "pack": 1300.0,
                                                   "unpack": 1200.0, "bucketed": 620.0}},
        "hf_rollout": {"ok": True, "rows": 128, "tokens": 16384, "generate_s": 3.0, "tokens_per_s": 5461.0,
                       "parameters": 154_000_000, "dtype": "torch.bfloat16", "logprobs_finite": True},
        "deepspeed_zero2": ds | {"zero_stage": 2},
        "deepspeed_zero3": ds | {"zero_stage": 3},
        "weight_sync": {"ok": True, "wire": "gloo", "bytes": 1_906_446_336, "buckets": 33, "verified": True,
                        "GBps": {"bucketed": 1.1, "raw": 1.6, "raw_host": 2.4}, "ratio": 1.45},
        "grpo_step": {"ok": True, "rows": 128, "rollout_tokens_per_s": 5100.0, "samples_per_s": 30.0,
                      "step_s": 4.2, "synced": True,
                      "phase_detail_s": dict.fromkeys(gpu_throughput.PHASES, 0.5)},
    }


@pytest.mark.unit
def test_gpu_shaped_results_summarise_and_compare_with_the_planner() -> None:
    results = _gpu_results()
    memory = gpu_check.check_memory(gpu_check.GPU, True, {2: results["deepspeed_zero2"],
                                                         3: results["deepspeed_zero3"]})
    assert memory["ok"] and isinstance(memory["within_25pct"], bool)
    assert memory["planned_parameters"] == 953_223_168
    for stage in ("zero2", "zero3"):
        assert memory[stage]["ratio_allocated"] > 0 and memory[stage]["ratio_device"] > 0
    for name, result in [*results.items(), ("memory_estimate", memory)]:
        line = gpu_check.describe(name, result)
        assert line and "None" not in line.split(";")[0], (name, line)
    missing = gpu_check.check_memory(gpu_check.GPU, True, {2: results["deepspeed_zero2"]})
    assert not missing["ok"] and "no measured peak" in missing["error"]


@pytest.mark.unit
def test_a_sync_round_lasts_as_long_as_its_slower_end() -> None:
    sender = {"bytes": 4 * 10**9, "seconds": {"bucketed": [2.0, 1.0, 3.0], "raw": [1.0, 1.0, 1.0]}}
    receiver = {"seconds": {"bucketed": [2.5, 4.0, 1.0], "raw": [0.5, 2.0, 0.9]}}
    summary = gpu_throughput.sync_summary(sender, receiver)
    assert summary["median_s"] == {"bucketed": 3.0, "raw": 1.0}  # rounds 2.5 4 3 and 1 2 1
    assert summary["GBps"] == {"bucketed": pytest.approx(4 / 3), "raw": pytest.approx(4.0)}
    assert summary["ratio"] == pytest.approx(3.0)


@pytest.mark.unit
def test_a_step_reads_as_the_drivers_metrics_row() -> None:
    phases = {"generate": 2.0, "reward": 0.5, "experience": 0.1, "forward": 0.4, "backward": 0.8,
              "optimizer": 0.2, "sync": 1.0}
    row = gpu_throughput.driver_row(phases, rows=50, tokens=6400)
    assert row["time_train_s"] == pytest.approx(1.5) and row["samples_per_second"] == pytest.approx(10.0)
    steady = gpu_throughput.gpu.steady_state([row | {"time_rollout_s": 99.0}, row], 1, 50)
    assert steady["step_s"] == pytest.approx(5.0) and steady["rollout_tokens_per_s"] == pytest.approx(3200)


@pytest.mark.unit
def test_without_wheels_or_missing_packages_nothing_is_installed(tmp_path: Path) -> None:
    assert gpu_check.install_wheels(tmp_path)["installed"] is False
