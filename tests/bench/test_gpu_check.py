"""bench/gpu_check.py: its CPU smoke run end to end (every check runs or says why not), and the
summaries of GPU-shaped results, so the one call on the lent GPU machine does not trip on them."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench import gpu_check  # noqa: E402

CHECKS = ["versions", "cuda_ipc", "nccl_same_gpu", "bucket_pack", "hf_rollout", "deepspeed_zero2",
          "deepspeed_zero3", "memory_estimate"]
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
def test_without_wheels_or_missing_packages_nothing_is_installed(tmp_path: Path) -> None:
    assert gpu_check.install_wheels(tmp_path)["installed"] is False
