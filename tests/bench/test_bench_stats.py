"""The benchmarks' pure helpers: step summaries, weight-sync shapes and rates, operator counts,
and the summary tables that read every kind of results.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench import operator_scale as bench_operator  # noqa: E402
from bench import stats, summary, weight_sync  # noqa: E402

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


# -- bench/stats.py -------------------------------------------------------------------------------


def _metrics(step: int, samples_per_second: float) -> dict[str, float]:
    return {"step": step, "reward_mean": step / 10, "samples_per_second": samples_per_second,
            "time_rollout_s": 0.5, "time_reward_s": 0.1, "time_train_s": 1.0, "time_sync_s": 0.05}


def test_kuberlhf_step_length_comes_from_the_driver_rate_and_its_end_from_the_arrival():
    rows = stats.kuberlhf_steps([_metrics(1, 16.0), _metrics(2, 32.0)], [12.0, 13.5], started=10.0,
                                samples_per_step=32)
    assert [r["step_s"] for r in rows] == [2.0, 1.0]
    assert [r["t_end_s"] for r in rows] == [2.0, 3.5]
    assert rows[0]["phases_s"] == {"rollout": 0.5, "reward": 0.1, "train": 1.0, "sync": 0.05}


def test_kuberlhf_steps_refuse_metrics_lines_without_arrival_times():
    with pytest.raises(ValueError, match="2 metrics lines but only 1 arrival"):
        stats.kuberlhf_steps([_metrics(1, 16.0), _metrics(2, 16.0)], [1.0], started=0.0, samples_per_step=32)


def test_trl_steps_take_lengths_and_phases_from_their_own_timestamps():
    record = {"step": 1, "reward_mean": 0.2, "t_begin": 101.0, "t_end": 103.5, "time_generate_s": 1.0,
              "time_reward_s": 0.1, "time_train_s": 1.2}
    (row,) = stats.trl_steps([record], started=100.0)
    assert row["step_s"] == 2.5 and row["t_end_s"] == 3.5
    assert row["phases_s"] == {"generate": 1.0, "reward": 0.1, "train": 1.2}


def test_summary_leaves_warmup_steps_out_of_the_steady_state():
    rows = [{"step": i, "reward_mean": i / 10, "t_end_s": 10.0 + 2 * i, "step_s": s, "phases_s": {"train": s}}
            for i, s in enumerate([10.0, 4.0, 2.0, 2.0], start=1)]
    out = stats.summarise(rows, wall_s=20.0, peak_rss_bytes=2**30, samples_per_step=32, warmup=2)
    assert out["steady_state_steps"] == [3, 4]
    assert out["steady_step_s"] == 2.0 and out["steady_samples_per_s"] == 16.0
    assert out["startup_s"] == pytest.approx(2.0)  # the first step ended at 12 s and took 10 s
    assert out["peak_rss_mib"] == 1024 and out["reward_first"] == 0.1 and out["reward_last"] == 0.4


def test_summary_keeps_every_step_when_the_run_is_shorter_than_the_warmup():
    rows = [{"step": 1, "reward_mean": 0.0, "t_end_s": 3.0, "step_s": 1.0, "phases_s": {}}]
    out = stats.summarise(rows, wall_s=4.0, peak_rss_bytes=0, samples_per_step=8, warmup=2)
    assert out["steady_state_steps"] == [1] and out["steady_state_excludes_warmup"] is False
    assert "steady_step_s" not in stats.summarise([], 1.0, 0, 8, 2)


def test_ratios_are_none_where_a_side_is_missing_or_zero():
    ours = {"wall_s": 10.0, "startup_s": 3.0, "peak_rss_mib": 5.0}
    out = stats.ratios(ours, {"wall_s": 5.0, "startup_s": 0.0})
    assert out["wall_s"] == 2.0 and out["startup_s"] is None and out["peak_rss_mib"] is None


# -- bench/weight_sync.py ---------------------------------------------------------------------------


def test_model_sizes_have_roughly_the_parameters_their_names_promise():
    targets = {"1M": 1e6, "10M": 10e6, "50M": 50e6, "100M": 100e6}
    for name, target in targets.items():
        count = weight_sync.parameter_count(weight_sync.transformer_shapes(weight_sync.SIZES[name]))
        assert 0.9 * target <= count <= 1.15 * target, (name, count)


def test_transformer_shapes_follow_the_layer_layout_with_unique_names():
    layout = weight_sync.Layout(hidden=8, layers=2, intermediate=16, vocab=32)
    shapes = weight_sync.transformer_shapes(layout)
    names = [n for n, _ in shapes]
    assert len(names) == len(set(names)) == 3 + 12 * 2
    per_layer = 4 * 8 * 8 + 3 * 8 + 2 * 8 + 3 * 16 * 8
    assert weight_sync.parameter_count(shapes) == 2 * 32 * 8 + 8 + 2 * per_layer
    assert dict(shapes)["model.layers.1.mlp.down_proj.weight"] == (8, 16)


def test_size_and_bucket_options_are_parsed_or_refused_with_the_choices():
    assert weight_sync.parse_sizes(" 1M,100M ") == ["1M", "100M"]
    with pytest.raises(ValueError, match=r"--sizes: unknown size\(s\) 7B; choose from 1M, 10M"):
        weight_sync.parse_sizes("1M,7B")
    assert weight_sync.parse_bucket_mb("64,4") == [64, 4]
    for bad in ("0", "64,64", "x", ""):
        with pytest.raises(ValueError, match="--bucket-mb"):
            weight_sync.parse_bucket_mb(bad)


def test_timing_reports_the_median_sync_and_its_rate():
    out = weight_sync.timing([0.5, 0.1, 0.2], nbytes=1000)
    assert out["median_s"] == 0.2 and out["min_s"] == 0.1 and out["bytes_per_s"] == 5000
    with pytest.raises(ValueError, match="no timed syncs"):
        weight_sync.timing([], nbytes=1)


def test_speedup_is_per_parameter_seconds_over_bucketed_seconds_per_size():
    rows = [{"size": "1M", "mode": "gloo-per-parameter", "median_s": 0.6},
            {"size": "1M", "mode": "gloo-bucketed-64MiB", "median_s": 0.1},
            {"size": "1M", "mode": "gloo-bucketed-4MiB", "median_s": 0.3},
            {"size": "10M", "mode": "gloo-bucketed-64MiB", "median_s": 0.5}]
    assert weight_sync.speedups(rows, "gloo", 64) == {"1M": pytest.approx(6.0)}
    assert weight_sync.speedups(rows, "gloo", 4) == {"1M": pytest.approx(2.0)}
    assert weight_sync.speedups(rows, "nccl", 64) == {}


def test_every_collective_case_list_has_the_raw_floor_each_bucket_size_and_per_parameter():
    assert weight_sync.collective_cases([64, 4]) == [("raw", 0), ("bucketed", 64), ("bucketed", 4),
                                                     ("per-parameter", 0)]


def test_fingerprint_tells_swapped_tensors_apart():
    a, b = torch.arange(4.0), torch.arange(4.0) * 2
    assert weight_sync.fingerprint([("a", a), ("b", b)]) == weight_sync.fingerprint([("a", a.clone()),
                                                                                    ("b", b.clone())])
    assert weight_sync.fingerprint([("a", a), ("b", b)]) != weight_sync.fingerprint([("a", b), ("b", a)])


def test_nccl_is_skipped_with_a_reason_without_two_gpus():
    reason = weight_sync.nccl_skip_reason()
    if torch.cuda.device_count() >= 2:
        assert reason is None
    else:
        assert reason and ("CUDA" in reason or "GPU" in reason)


# -- bench/operator_scale.py ------------------------------------------------------------------------------


def test_job_manifests_are_valid_numbered_copies_of_the_example():
    from kuberlhf.api import parse_job

    template = yaml.safe_load(bench_operator.EXAMPLE.read_text())
    job = bench_operator.job_manifest(template, 7)
    assert job["metadata"] == {"name": "bench-007", "namespace": "default"}
    assert template["metadata"]["name"] != "bench-007"
    assert parse_job(job).metadata.name == "bench-007"


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert bench_operator.percentile(values, 50) == 50.0
    assert bench_operator.percentile(values, 95) == 95.0
    assert bench_operator.percentile([3.0], 95) == 3.0
    with pytest.raises(ValueError):
        bench_operator.percentile([], 50)


def test_latency_runs_from_the_create_answer_to_the_rayjob_and_skips_jobs_without_one():
    assert bench_operator.latencies({"a": 1.0, "b": 2.0}, {"a": 1.5, "c": 9.0}) == {"a": 0.5}


def test_requests_are_counted_by_verb_with_discovery_for_the_rest():
    logged = [{"verb": "create"}, {"verb": "create"}, {"verb": "patch"}, {"verb": None}]
    assert bench_operator.requests_by_verb(logged) == {"create": 2, "patch": 1, "discovery": 1}


def test_a_rayjob_belongs_to_the_rlhfjob_in_its_owner_references():
    rayjob = {"metadata": {"ownerReferences": [{"kind": "ConfigMap", "name": "x"},
                                               {"kind": "RLHFJob", "name": "bench-001"}]}}
    assert bench_operator.owner_job(rayjob) == "bench-001"
    assert bench_operator.owner_job({"metadata": {}}) is None


# -- bench/summary.py -------------------------------------------------------------------------------

WEIGHT_SYNC_RESULTS = {
    "benchmark": "weight-sync", "created": "20261125-120000",
    "rows": [{"size": "100M", "parameters": 110_000_000, "tensors": 147, "bytes": 440 * 2**20,
              "mode": "gloo-bucketed-64MiB", "buckets": 7, "median_s": 0.5, "bytes_per_s": 880 * 2**20,
              "verified": True}],
    "bucketed_speedup": {"gloo": {"64MiB": {"100M": 1.2}}, "nccl": {"64MiB": {}}},
    "goal": {"size": "100M", "bucket": "64MiB", "target": 5.0, "ratio": 1.2},
    "nccl_skipped": "no CUDA device",
}
OPERATOR_RESULTS = {
    "benchmark": "operator", "created": "20261125-130000", "config": {"create_via": "16 threads, POST"},
    "measured": {"jobs": 100, "all_rayjobs_s": 2.5, "requests_per_job": 13.0,
                 "requests_by_verb": {"create": 800, "patch": 300}, "operator_peak_rss_mib": 86.0},
}
VS_TRL_RESULTS = {"created": "20261125-110000", "config": {"steps": 2},
                  "systems": {"kuberlhf": {"exit_code": 0, "steps_done": 2, "wall_s": 30.0}},
                  "ratios_kuberlhf_over_trl": {}}


def test_weight_sync_table_shows_rate_verification_and_the_unmet_goal():
    text = summary.tables([WEIGHT_SYNC_RESULTS])
    row = next(line for line in text.splitlines() if "gloo-bucketed-64MiB" in line)
    assert "0.5000" in row and "880" in row and "yes" in row
    assert "goal >= 5x at 100M (64MiB buckets): 1.20x, NOT met" in text
    assert "NCCL skipped: no CUDA device" in text


def test_operator_table_shows_time_requests_and_memory():
    text = summary.tables([OPERATOR_RESULTS])
    row = text.splitlines()[2]
    assert "2.50" in row and "13.0" in row and "86" in row and "create 800 patch 300" in row


def test_each_kind_gets_its_own_table_and_old_files_count_as_vs_trl():
    text = summary.tables([OPERATOR_RESULTS, VS_TRL_RESULTS, WEIGHT_SYNC_RESULTS, {"benchmark": "mystery"}])
    assert text.index("kuberlhf/TRL") < text.index("gloo-bucketed") < text.index("requests/job")
    assert "no table for benchmark kind(s): mystery" in text


def test_without_arguments_the_newest_run_of_each_kind_is_shown(tmp_path: Path):
    files = []
    for stamp, results in [("1-a", VS_TRL_RESULTS), ("2-weight-sync", WEIGHT_SYNC_RESULTS),
                           ("3-b", VS_TRL_RESULTS), ("4-operator", OPERATOR_RESULTS)]:
        path = tmp_path / stamp / "results.json"
        path.parent.mkdir()
        path.write_text(json.dumps(results))
        files.append(path)
    assert summary.newest_per_kind(files) == [files[1], files[2], files[3]]


def test_vs_trl_table_has_a_ratio_row_for_each_kuberlhf_mode():
    system = {"exit_code": 0, "steps_done": 2, "steady_samples_per_s": 30.0}
    results = {"benchmark": "vs_trl", "created": "20261201-130000", "config": {"steps": 2},
               "systems": {"kuberlhf": system, "trl": system, "kuberlhf-async": system},
               "ratios_over_trl": {"kuberlhf": {"steady_samples_per_s": 1.04},
                                   "kuberlhf-async": {"steady_samples_per_s": 1.25}}}
    lines = summary.tables([results]).splitlines()
    assert any("kuberlhf/TRL" in line and "1.04x" in line for line in lines)
    assert any("kuberlhf-async/TRL" in line and "1.25x" in line for line in lines)


def _workload(size_name: str = "11m") -> object:
    from bench import common, vs_trl

    return vs_trl.Workload(common.BenchConfig(), vs_trl.SIZES[size_name], Path("/m"), Path("/p.jsonl"),
                           "0" * 64, None, 60.0, "auto")


def test_the_async_run_gets_the_same_spec_but_overlapping_steps_corrected_for_staleness():
    from bench import vs_trl

    template = yaml.safe_load(vs_trl.SPEC_TEMPLATE.read_text())
    sync = vs_trl.render_spec(template, _workload())
    overlapped = vs_trl.render_spec(template, _workload(), off_policy_steps=1)
    assert overlapped["spec"]["rollout"].pop("offPolicySteps") == 1
    assert sync["spec"]["rollout"].pop("offPolicySteps") == 0
    assert overlapped["spec"]["loss"].pop("rolloutCorrection") == {"mode": "token-clip"}
    assert "rolloutCorrection" not in sync["spec"]["loss"]
    assert overlapped == sync


def test_each_size_runs_kuberlhf_with_its_own_engine_and_precision():
    from bench import vs_trl

    template = yaml.safe_load(vs_trl.SPEC_TEMPLATE.read_text())
    for name, size in vs_trl.SIZES.items():
        spec = vs_trl.render_spec(template, _workload(name))["spec"]
        assert (spec["rollout"]["engine"], spec["precision"]) == (size.engine, size.precision), name


def test_unknown_sizes_are_refused_with_the_choices():
    from bench import vs_trl

    assert vs_trl.parse_sizes("135m, 11m") == ["135m", "11m"]
    with pytest.raises(ValueError, match=r"unknown size\(s\) 7b; choose from 11m, 135m"):
        vs_trl.parse_sizes("11m,7b")


def test_model_flops_count_generation_and_training_over_the_whole_sequence():
    assert stats.model_flops_per_sample(1000, prompt_tokens=10, response_tokens=30) == 8 * 1000 * 40
    summary_ = {"steady_step_s": 2.0, "steady_response_tokens_mean": 30.0}
    out = stats.mfu(summary_, 1000, prompt_tokens=10, samples_per_step=4, peaks_gflops={"fp32": 1e-3})
    assert out is not None
    assert out["model_gflops_per_s"] == pytest.approx(8 * 1000 * 40 * 4 / 2.0 / 1e9)
    assert out["mfu_fp32"] == pytest.approx(out["model_gflops_per_s"] / 1e-3)
    assert stats.mfu({"steady_step_s": 2.0}, 1000, 10, 4, {"fp32": 1.0}) is None


def test_summary_keeps_the_mean_response_length_and_the_tail_reward():
    rows = [{"step": i, "reward_mean": r, "t_end_s": float(i), "step_s": 1.0, "phases_s": {},
             "response_length_mean": float(10 * i)} for i, r in enumerate([0.1, 0.2, 0.3, 0.5, 0.7], start=1)]
    out = stats.summarise(rows, wall_s=6.0, peak_rss_bytes=0, samples_per_step=4, warmup=2)
    assert out["steady_response_tokens_mean"] == pytest.approx(40.0)
    assert out["reward_tail_mean"] == pytest.approx(0.5)


def test_the_headline_is_samples_per_second_over_trl_for_sync_and_async():
    from bench import vs_trl

    systems = {"kuberlhf": {"steady_samples_per_s": 30.0, "reward_tail_mean": 0.4},
               "trl": {"steady_samples_per_s": 20.0, "reward_tail_mean": 0.3},
               "kuberlhf-async": {"steady_samples_per_s": 45.0}}
    out = vs_trl.headline(systems)
    assert out["ratio_vs_trl"] == {"sync": 1.5, "async": 2.25} and out["trl_compared"] == "trl"
    assert out["reward_after_steps"] == {"kuberlhf": 0.4, "trl": 0.3, "kuberlhf-async": None}
    assert vs_trl.headline({**systems, "trl": {}})["ratio_vs_trl"] == {"sync": None, "async": None}
    # Against TRL's faster configuration when several ran.
    faster = vs_trl.headline({**systems, "trl-bf16": {"steady_samples_per_s": 25.0}})
    assert faster["trl_compared"] == "trl-bf16" and faster["ratio_vs_trl"]["sync"] == pytest.approx(1.2)


def test_matmul_parameters_count_a_tied_output_projection_and_skip_the_lookup(tmp_path: Path):
    from safetensors.torch import save_file

    from bench import common

    tensors = {"model.embed_tokens.weight": torch.zeros(50, 8), "model.norm.weight": torch.zeros(8),
               "model.layers.0.mlp.up_proj.weight": torch.zeros(16, 8)}
    for tied, head, expected in ((True, False, 50 * 8 + 16 * 8), (False, True, 16 * 8 + 50 * 8),
                                 (False, False, 16 * 8)):
        folder = tmp_path / f"{tied}-{head}"
        folder.mkdir()
        save_file(tensors | ({"lm_head.weight": torch.zeros(50, 8)} if head else {}),
                  str(folder / common.WEIGHTS_FILE))
        (folder / "config.json").write_text(json.dumps({"tie_word_embeddings": tied}))
        assert common.matmul_parameters(folder) == expected, (tied, head)


def test_vs_trl_table_shows_every_size_with_its_headline_and_mfu():
    system = {"exit_code": 0, "steps_done": 2, "steady_samples_per_s": 30.0,
              "mfu": {"model_gflops_per_s": 12.0, "mfu_fp32": 0.1, "mfu_bf16": 0.04}}
    entry = {"config": {"steps": 2}, "systems": {"kuberlhf": system, "trl": system},
             "ratios_over_trl": {"kuberlhf": {"steady_samples_per_s": 1.0}},
             "ratio_vs_trl": {"sync": 1.6, "async": None},
             "reward_after_steps": {"kuberlhf": 0.5, "trl": 0.4}}
    results = {"benchmark": "vs_trl", "created": "20261204-200000", "sizes": {"11m": entry, "135m": entry},
               "peak_gflops": {"fp32": 120.0, "bf16": 300.0}}
    text = summary.tables([results])
    assert "20261204-200000 11m" in text and "20261204-200000 135m" in text
    assert "12.0 (10% / 4%)" in text
    assert ("135m: ratio_vs_trl sync 1.60x, async -; reward after the same steps: kuberlhf 0.500, "
            "trl 0.400") in text
    assert "fp32 120 GFLOP/s, bf16 300 GFLOP/s" in text


def test_rounds_alternate_their_order_so_drift_shifts_every_system_alike():
    from bench import vs_trl

    order = vs_trl.round_order(["a", "b", "c"], 2)
    assert order == [(0, "a"), (0, "b"), (0, "c"), (1, "c"), (1, "b"), (1, "a")]


def test_rounds_combine_into_medians_and_keep_each_round():
    def one(rate: float, rollout: float, exit_code: int = 0) -> dict[str, object]:
        return {"exit_code": exit_code, "steps_done": 2, "steady_samples_per_s": rate, "startup_s": rate / 10,
                "steady_phases_s": {"rollout": rollout}, "steps": [{"step": 1}], "reward_first": 0.1}

    combined = stats.combine_rounds([one(30.0, 0.5), one(36.0, 0.3), one(33.0, 0.4, exit_code=1)])
    assert combined["steady_samples_per_s"] == 33.0 and combined["startup_s"] == 3.3
    assert combined["steady_phases_s"] == {"rollout": 0.4}
    assert combined["exit_code"] == 1, "a failed round fails the system"
    assert combined["steps"] == [{"step": 1}] and len(combined["rounds"]) == 3
    assert all("steps" not in r for r in combined["rounds"])


def test_packing_table_shows_each_layouts_step_time_and_speedup_per_size():
    layouts = {"pad": {"tokens": 2112, "wall_s": 1.4, "cpu_s": 2.7, "speedup_vs_pad_cpu": 1.0,
                       "speedup_vs_main_wall": 1.1},
               "pack": {"tokens": 1122, "wall_s": 0.7, "cpu_s": 1.35, "speedup_vs_pad_cpu": 2.0,
                        "speedup_vs_main_wall": 2.16}}
    text = summary.tables([{"benchmark": "packing", "created": "r1", "sizes": {"11m": {"layouts": layouts}}}])
    pack = next(line for line in text.splitlines() if " pack " in line)
    assert pack.split() == ["r1", "11m", "pack", "1122", "0.70", "1.35", "2.00x", "2.16x"]


def test_engine_parity_reports_each_engines_spread_and_the_gap_in_standard_errors():
    from bench import engine_parity

    out = engine_parity.summarise({"hf": [0.4, 0.6], "vllm": [0.5, 0.7]})
    assert out["hf"]["mean"] == pytest.approx(0.5) and out["vllm"]["stdev"] == pytest.approx(0.1414, abs=1e-4)
    assert out["gap_vllm_minus_hf"] == pytest.approx(0.1)
    assert out["gap_in_standard_errors"] == pytest.approx(0.1 / (0.02 / 2 + 0.02 / 2) ** 0.5)
    assert engine_parity.summarise({"hf": [0.5], "vllm": [0.6]})["gap_in_standard_errors"] is None
    results = {"benchmark": "engine-parity", "created": "x", "steps": 20, "seeds": 2, "summary": out}
    table = summary.tables([results])
    assert "+0.100" in table and "+0.71" in table
