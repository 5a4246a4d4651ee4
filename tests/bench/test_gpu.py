"""bench/gpu.py's pure parts: the GRPO spec it fills in for each machine, the steady-state summary
of metrics.jsonl, the failure notes, the summary table, and the refusal to run without CUDA."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench import gpu, summary  # noqa: E402
from kuberlhf.api import parse_job  # noqa: E402

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def _spec(gpus: int, engine: str = "vllm") -> dict:
    template = yaml.safe_load(gpu.SPEC_TEMPLATE.read_text())
    return gpu.render_spec(template, "builtin:smollm2-135m", engine, gpus, gpu.workload(False, "cuda"))


@pytest.mark.parametrize(("gpus", "placement", "per_replica"), [(0, "separate", 0), (1, "colocate", 1),
                                                                  (2, "separate", 1), (8, "separate", 1)])
def test_rendered_spec_validates_and_fits_the_gpu_count(gpus: int, placement: str, per_replica: int) -> None:
    job = parse_job(_spec(gpus, "hf" if gpus == 0 else "vllm"))
    assert job.spec.placement == placement
    assert job.spec.rollout.resources.gpus == per_replica
    assert job.spec.actor.resources.gpus == per_replica
    assert job.spec.schedule.steps == 8
    assert job.spec.actor.micro_batch_size == 16 * 4
    assert Path(job.spec.reward.function.split(":")[0]).is_file()


def test_one_shared_gpu_leaves_room_for_the_trainer() -> None:
    assert parse_job(_spec(1)).spec.rollout.gpu_memory_utilization < 0.5
    assert parse_job(_spec(2)).spec.rollout.gpu_memory_utilization == 0.9


def _row(samples_per_second: float, rollout: float) -> dict[str, float]:
    return {"samples_per_second": samples_per_second, "time_rollout_s": rollout, "time_reward_s": 0.1,
            "time_train_s": 1.0, "time_sync_s": 0.05, "rollout_tokens": 640}


def test_steady_state_leaves_out_the_warmup_steps() -> None:
    rows = [_row(1.0, 30.0), _row(2.0, 20.0), _row(32.0, 0.5), _row(16.0, 1.5)]
    steady = gpu.steady_state(rows, warmup=2, samples_per_step=32)
    assert steady["steps_measured"] == 2
    assert steady["step_s"] == pytest.approx((1.0 + 2.0) / 2)
    assert steady["samples_per_s"] == pytest.approx(64 / 3.0)
    assert steady["phases_s"]["rollout"] == pytest.approx(1.0)
    assert steady["rollout_tokens_per_s"] == pytest.approx(1280 / 2.0)


def test_steady_state_of_a_run_that_wrote_nothing_is_empty() -> None:
    assert gpu.steady_state([], warmup=2, samples_per_step=32) == {}


def test_error_line_prefers_the_line_naming_the_error(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.write_text("loading\nValueError: head size 48 is not supported\n  see the docs\n")
    assert gpu.error_line(log) == "ValueError: head size 48 is not supported"


def test_gpu_table_shows_rates_ratio_phases_and_failures() -> None:
    results = {
        "benchmark": "gpu", "created": "20261125-170000", "model": "builtin:smollm2-135m",
        "versions": {"gpus": ["NVIDIA H100"], "torch": "2.13.0", "cuda": "12.8", "vllm": "0.32.0"},
        "rollout": {"hf": {"ok": True, "tokens_per_s": 1500.0, "load_s": 3.0},
                    "vllm": {"ok": False, "error": "exit 1: out of memory"}},
        "vllm_over_hf": None,
        "grpo": {"ok": True, "steps_done": 8,
                 "config": {"engine": "vllm", "placement": "colocate", "steps": 8},
                 "step_s": 2.5, "samples_per_s": 25.6, "phases_s": {"rollout": 1.2, "train": 1.1}},
    }
    text = summary.tables([results])
    assert "NVIDIA H100" in text and "1500" in text and "FAILED" in text
    assert "vllm colocate 8/8 ok" in text and "rollout 1.20 train 1.10" in text
    assert "vllm: exit 1: out of memory" in text and "torch 2.13.0 CUDA 12.8" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_the_benchmark_exits_2_naming_the_cpu_mode(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu.main([]) == 2
    assert "--device cpu" in capsys.readouterr().err


def test_gpu_table_marks_a_skipped_half_as_skipped_not_failed() -> None:
    results = {"benchmark": "gpu", "rollout": {}, "grpo": {"ok": False, "skipped": True}}
    row = summary.gpu_table([results]).splitlines()[2]
    assert row.count("skipped") == 3
    assert "FAILED" not in row
