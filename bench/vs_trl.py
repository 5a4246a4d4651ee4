"""kuberlhf against TRL's GRPOTrainer: the same GRPO work, one after the other, on the same cores,
at two model sizes.

    .venv-bench/bin/python bench/vs_trl.py [--sizes 11m,135m] [--rounds 2] [--out bench/out/<timestamp>]

For each size (`SIZES`: the 11M Llama built here, and SmolLM2-135M-Instruct as
`builtin:smollm2-135m` builds it) it writes one model / tokenizer / prompt file, then runs three
systems as child processes pinned with `taskset` to the same cores and with the same torch thread
count: `kuberlhf run` (in .venv) synchronous, bench/trl_side.py (in .venv-bench), and `kuberlhf
run` again with `rollout.offPolicySteps: 1` (generation of step k+1 overlaps training of step k),
in rounds whose order alternates (see `round_order`), and reports each system's medians over its
rounds. Each system runs in its own best CPU configuration (`Size`). The matmul peaks in fp32 and
bf16 are measured on the same cores before the first size and after the last (bench/peak.py; the
higher of the two), for MFU. Samples the RSS of each process tree every 0.2 s, and writes
results.json, one reward_vs_time-<size>.png per size and a summary table into the output folder.
Run it with .venv-bench's Python: it needs psutil and matplotlib, which live there.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import yaml

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import procs  # noqa: E402
import stats  # noqa: E402
import summary  # noqa: E402

SPEC_TEMPLATE = BENCH / "specs" / "grpo-vs-trl.yaml"
REWARD_FILE = BENCH / "rewards" / "digits.py"
ASYNC = "kuberlhf-async"
KUBERLHF_PYTHON = ROOT / ".venv" / "bin" / "python"


@dataclass(frozen=True)
class Size:
    """One model size and how each system runs it on this CPU. `engine` and `precision` are
    kuberlhf's spec fields; `trl` lists the TRL configurations run (TRL's `bf16` on CPU is torch
    autocast over fp32 weights, as kuberlhf's bf16 is): its best is the one compared against."""

    steps: int
    learning_rate: float
    prompts_per_step: int = 8
    engine: str = "hf"
    precision: str = "auto"
    trl: tuple[str, ...] = ("fp32", "bf16")
    builtin: str | None = None  # built by kuberlhf's own recipe, else common.build_model


SIZES: dict[str, Size] = {
    "11m": Size(steps=20, learning_rate=1e-3, precision="bf16"),
    # A 135M step costs ~12x an 11M one: fewer steps of half the prompts keep a round near 4 minutes,
    # and TRL runs only in bf16, the faster of its two at 11M.
    "135m": Size(steps=8, learning_rate=2e-5, prompts_per_step=4, engine="vllm", precision="bf16",
                 trl=("bf16",), builtin="smollm2-135m"),
}


def trl_name(precision: str) -> str:
    return "trl" if precision == "fp32" else f"trl-{precision}"


def parse_sizes(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SIZES]
    if unknown or not names:
        listed = ", ".join(unknown) or "(none)"
        raise ValueError(f"--sizes: unknown size(s) {listed}; choose from {', '.join(SIZES)}")
    return names


@dataclass(frozen=True)
class Workload:
    """What every system of one size shares: the workload, the files, the cores."""

    cfg: common.BenchConfig
    size: Size
    model: Path
    prompts: Path
    sha: str
    cpus: str | None
    timeout_s: float
    weight_sync: str


def render_spec(template: dict[str, Any], work: Workload, off_policy_steps: int = 0) -> dict[str, Any]:
    """The template with every shared path, workload number and kuberlhf setting filled in."""
    cfg = work.cfg
    doc = json.loads(json.dumps(template))
    spec = doc["spec"]
    spec["precision"] = work.size.precision
    spec["model"]["actor"] = str(work.model)
    spec["reward"]["function"] = f"{REWARD_FILE}:reward"
    spec["data"].update(prompts=str(work.prompts), maxNewTokens=cfg.max_new_tokens)
    spec["rollout"].update(
        engine=work.size.engine,
        samplesPerPrompt=cfg.samples_per_prompt,
        promptsPerStep=cfg.prompts_per_step,
        temperature=cfg.temperature,
        offPolicySteps=off_policy_steps,
    )
    spec["actor"].update(learningRate=cfg.learning_rate, microBatchSize=cfg.samples_per_step)
    spec["kl"]["coef"] = cfg.beta
    if off_policy_steps:
        # Stale rollouts, corrected as decoupled PPO does: PPO's clip around the trainer's own
        # log-probs, the engine's staleness weighed by truncated importance sampling. Without it the
        # clip around the stale engine's log-probs drops much of each update (11M: reward 0.40 after
        # 20 steps against 0.64 with it and 0.665 synchronous).
        spec["loss"]["rolloutCorrection"] = {"mode": "token-clip"}
    spec["schedule"]["steps"] = cfg.steps
    spec["checkpoint"]["everySteps"] = cfg.steps
    spec["seed"] = cfg.seed
    spec["weightSync"]["transport"] = work.weight_sync
    return doc


def run_kuberlhf(work: Workload, side: Path, off_policy_steps: int = 0) -> dict[str, Any]:
    side.mkdir(parents=True, exist_ok=True)
    spec_path = side / "spec.yaml"
    template = yaml.safe_load(SPEC_TEMPLATE.read_text())
    spec_path.write_text(yaml.safe_dump(render_spec(template, work, off_policy_steps), sort_keys=False))
    run_dir = side / "run"
    command = [str(ROOT / ".venv" / "bin" / "kuberlhf"), "run", str(spec_path), "--output", str(run_dir)]
    watcher = procs.LineWatcher(run_dir / "metrics.jsonl")
    threads = procs.threads_for(work.cpus)
    record = procs.run_measured(
        procs.pinned([*command, "--quiet", "--no-resume"], work.cpus),
        common.child_env(threads),
        side / "log.txt",
        work.timeout_s,
        watcher,
        cwd=ROOT,
    )
    rows = stats.kuberlhf_steps(
        procs.read_jsonl(run_dir / "metrics.jsonl"), watcher.arrivals, record["started"],
        work.cfg.samples_per_step,
    )
    latest = run_dir / "checkpoints" / "latest"
    final = run_dir / "checkpoints" / latest.read_text().strip() / "model" if latest.exists() else None
    return {**record, "rows": rows, "log": str(side / "log.txt"), "final_model": final}


def run_trl(work: Workload, side: Path, precision: str) -> dict[str, Any]:
    side.mkdir(parents=True, exist_ok=True)
    config_path = side / "config.json"
    config_path.write_text(json.dumps(work.cfg.as_dict()))
    threads = procs.threads_for(work.cpus)
    command = [
        str(ROOT / ".venv-bench" / "bin" / "python"),
        str(BENCH / "trl_side.py"),
        *("--model", str(work.model), "--prompts", str(work.prompts), "--reward", str(REWARD_FILE)),
        *("--config", str(config_path), "--expect-sha256", work.sha, "--threads", str(threads)),
        *("--out", str(side)),
        *(["--bf16"] if precision == "bf16" else []),
    ]
    record = procs.run_measured(
        procs.pinned(command, work.cpus), common.child_env(threads), side / "log.txt", work.timeout_s,
        lambda: None, cwd=ROOT,
    )
    rows = stats.trl_steps(procs.read_jsonl(side / "trl_steps.jsonl"), record["started"])
    final = side / "final"
    final_model = final if final.is_dir() else None
    return {**record, "rows": rows, "log": str(side / "log.txt"), "final_model": final_model}


def round_order(names: list[str], rounds: int) -> list[tuple[int, str]]:
    """(round, system) in run order: forwards, then backwards, and so on. A machine that drifts
    faster or slower during the benchmark then shifts every system alike instead of the last one."""
    order = []
    for index in range(rounds):
        order.extend((index, name) for name in (names if index % 2 == 0 else names[::-1]))
    return order


def summarise_run(record: dict[str, Any], work: Workload) -> dict[str, Any]:
    final = record["final_model"]
    return {
        "exit_code": record["rc"],
        "log": record["log"],
        "weights_relative_change": common.relative_change(work.model, final) if final else None,
        **stats.summarise(
            record["rows"],
            record["wall_s"],
            record["peak_rss_bytes"],
            work.cfg.samples_per_step,
            work.cfg.warmup_steps_excluded,
        ),
    }


def build_model(name: str, size: Size, cfg: common.BenchConfig, dest: Path) -> str:
    """The size's model in `dest` (sha256 of its weights): a builtin through kuberlhf's own recipe,
    run in .venv where that recipe's dependencies live; otherwise the seeded Llama built here."""
    if size.builtin is None:
        return common.build_model(dest, cfg)
    recipe = f"from pathlib import Path\nfrom kuberlhf_workers.base.builtin import BUILTIN_MODELS\n" \
             f"BUILTIN_MODELS[{size.builtin!r}].build(Path({str(dest)!r}))\n"
    done = subprocess.run([str(KUBERLHF_PYTHON), "-c", recipe], env=common.child_env(), cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name}: building builtin:{size.builtin} failed:\n{done.stderr[-2000:]}")
    return common.weights_sha256(dest)


def measure_peaks(cpus: str | None) -> dict[str, float]:
    """bench/peak.py's fp32 and bf16 GFLOP/s, pinned like the systems."""
    threads = procs.threads_for(cpus)
    command = procs.pinned([sys.executable, str(BENCH / "peak.py"), "--threads", str(threads)], cpus)
    done = subprocess.run(command, env=common.child_env(threads), capture_output=True, text=True, check=True)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    return {"fp32": float(found["fp32"]), "bf16": float(found["bf16"])}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, system in results["systems"].items():
        rows = system.get("steps", [])
        ax.plot([r["t_end_s"] for r in rows], [r["reward_mean"] for r in rows], marker="o", ms=3, label=name)
    ax.set_xlabel("wall-clock seconds since process start")
    ax.set_ylabel("mean reward (share of digits)")
    cfg = results["config"]
    ax.set_title(
        f"GRPO, {cfg['prompts_per_step']}x{cfg['samples_per_prompt']} samples x {cfg['max_new_tokens']} "
        f"tokens per step, {results['model']['parameters'] / 1e6:.1f}M params"
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def best_trl(systems: dict[str, Any]) -> str:
    """The TRL configuration with the most samples/s (the one kuberlhf is compared against)."""
    runs = {name: s.get("steady_samples_per_s") or 0.0 for name, s in systems.items()
            if name.startswith("trl")}
    return max(runs, key=lambda name: runs[name])


def headline(systems: dict[str, Any]) -> dict[str, Any]:
    """The issue's numbers for one size: samples/s over TRL's best configuration's, sync and async,
    and the rewards after the same steps (mean of the last stats.TAIL_STEPS steps)."""
    reference = best_trl(systems)
    trl = systems[reference].get("steady_samples_per_s")

    def ratio(name: str) -> float | None:
        ours = systems[name].get("steady_samples_per_s")
        return ours / trl if isinstance(ours, int | float) and trl else None

    return {
        "trl_compared": reference,
        "ratio_vs_trl": {"sync": ratio("kuberlhf"), "async": ratio(ASYNC)},
        "reward_after_steps": {name: s.get("reward_tail_mean") for name, s in systems.items()},
    }


def run_size(
    name: str, args: argparse.Namespace, out: Path, peaks: Callable[[], dict[str, float]]
) -> dict[str, Any]:
    """Every system on one size, in alternating rounds; that size's entry of results.json."""
    size = SIZES[name]
    cfg = common.BenchConfig(
        steps=args.steps or size.steps, learning_rate=args.learning_rate or size.learning_rate,
        prompts_per_step=size.prompts_per_step,
    )
    shared = out / "shared" / name
    model = shared / "model"
    model.mkdir(parents=True, exist_ok=True)
    print(f"[{name}] building the shared model and prompts in {shared}", flush=True)
    sha = build_model(name, size, cfg, model)
    prompts = common.write_prompts(shared / "prompts.jsonl", cfg.seed, cfg.prompts)
    work = Workload(cfg, size, model, prompts, sha, args.cpus or None, args.timeout, args.weight_sync)
    runners: dict[str, Callable[[Path], dict[str, Any]]] = {
        "kuberlhf": lambda side: run_kuberlhf(work, side),
        **{trl_name(p): partial(run_trl, work, precision=p) for p in size.trl},
        ASYNC: lambda side: run_kuberlhf(work, side, off_policy_steps=1),
    }
    rounds: dict[str, list[dict[str, Any]]] = {system: [] for system in runners}
    for index, system in round_order(list(runners), args.rounds):
        waited = procs.wait_quiet(work.cpus)
        print(f"[{name}] {system}: {cfg.steps} steps (round {index + 1}/{args.rounds}, the cores idle "
              f"after {waited:.0f} s) ...", flush=True)
        record = runners[system](out / name / system / f"round-{index + 1}")
        rounds[system].append(summarise_run(record, work))
        if common.weights_sha256(model) != sha:
            raise SystemExit("the shared weights changed during a run; the comparison is void")
    systems = {system: stats.combine_rounds(summaries) for system, summaries in rounds.items()}
    matmul = common.matmul_parameters(model)
    prompt_tokens = common.prompt_tokens_mean(model, prompts, cfg.steps * cfg.prompts_per_step)
    measured = peaks()
    for system in systems.values():
        system["mfu"] = stats.mfu(system, matmul, prompt_tokens, cfg.samples_per_step, measured)
    return {
        "config": cfg.as_dict(),
        "settings": {"kuberlhf_engine": size.engine, "kuberlhf_precision": size.precision,
                     "trl": list(size.trl), "kuberlhf_weight_sync": args.weight_sync},
        "model": {"path": str(model), "sha256": sha, "parameters": common.parameter_count(model),
                  "matmul_parameters": matmul, "builtin": size.builtin},
        "prompt_tokens_mean": prompt_tokens,
        "systems": systems,
        "ratios_over_trl": {
            system: stats.ratios(ours, systems[best_trl(systems)])
            for system, ours in systems.items() if not system.startswith("trl")
        },
        **headline(systems),
        "complete": all(
            s["exit_code"] == 0 and s["steps_done"] == cfg.steps for r in rounds.values() for s in r
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"of {', '.join(SIZES)} (default: all)")
    parser.add_argument("--steps", type=int, help="training steps per system (default: each size's own)")
    parser.add_argument("--learning-rate", type=float, help="default: each size's own")
    parser.add_argument("--out", type=Path, help="output folder (default bench/out/<UTC timestamp>)")
    parser.add_argument("--cpus", default="0-1", help="cores both runs are pinned to (taskset -c); '' = none")
    parser.add_argument(
        "--weight-sync",
        default="auto",
        choices=("auto", "gloo", "object-store"),
        help="kuberlhf's weightSync.transport (auto = gloo on CPU, the default a user gets)",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per system and round")
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="runs per system, in alternating order (A B C, C B A, ...); medians are reported (default 2)",
    )
    args = parser.parse_args(argv)
    try:
        sizes = parse_sizes(args.sizes)
    except ValueError as exc:
        parser.error(str(exc))
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    cpus = args.cpus or None
    if cpus and shutil.which("taskset") is None:
        parser.error("taskset (util-linux) is not installed: install it, or pass --cpus '' to run unpinned")
    if cpus and not set(procs.parse_cpus(cpus)) <= set(psutil.Process().cpu_affinity()):
        parser.error(f"--cpus {cpus}: this process may only use cores {psutil.Process().cpu_affinity()}")
    if importlib.util.find_spec("matplotlib") is None:
        parser.error(f"matplotlib is missing from {sys.executable}: run this with .venv-bench/bin/python")
    for needed in (ROOT / ".venv" / "bin" / "kuberlhf", ROOT / ".venv-bench" / "bin" / "python"):
        if not needed.exists():
            parser.error(f"{needed} is missing: run `make bench` (it builds both environments)")

    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    out: Path = (args.out or BENCH / "out" / stamp).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print("measuring the fp32 and bf16 matmul peaks on the pinned cores", flush=True)
    best = measure_peaks(cpus)

    def peaks() -> dict[str, float]:
        """The best of every measurement so far and one taken now (after each size's runs)."""
        now = measure_peaks(cpus)
        best.update({k: max(best[k], now[k]) for k in best})
        return dict(best)

    results: dict[str, Any] = {
        "benchmark": "vs_trl",
        "created": stamp,
        "rounds": args.rounds,
        "machine": {
            "cpus_pinned": cpus, "logical_cpus": psutil.cpu_count(), "threads": procs.threads_for(cpus)
        },
        "sizes": {},
    }
    for name in sizes:
        results["sizes"][name] = entry = run_size(name, args, out, peaks)
        results["peak_gflops"] = dict(best)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        plot(entry, out / f"reward_vs_time-{name}.png")
    print(summary.table([results]))
    print(f"\nresults: {out / 'results.json'}")
    failed = [name for name, entry in results["sizes"].items() if not entry["complete"]]
    if failed:
        print(f"incomplete: {', '.join(failed)} (see the logs above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
