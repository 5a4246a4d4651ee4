"""kuberlhf against TRL's GRPOTrainer: the same GRPO work, one after the other, on the same cores.

    .venv-bench/bin/python bench/vs_trl.py [--steps 20] [--rounds 2] [--out bench/out/<timestamp>]

Builds one model / tokenizer / prompt file, then runs three systems as child processes pinned
with `taskset` to the same cores and with the same torch thread count: `kuberlhf run` (in .venv)
synchronous, bench/trl_side.py (in .venv-bench), and `kuberlhf run` again with
`rollout.offPolicySteps: 1` (generation of step k+1 overlaps training of step k), in rounds
whose order alternates (see `round_order`), and reports each system's medians over its rounds.
Samples the RSS of each process tree every 0.2 s, and writes results.json, reward_vs_time.png
and a summary table into the output folder.
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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import yaml

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import stats  # noqa: E402
import summary  # noqa: E402

POLL_S = 0.2
SPEC_TEMPLATE = BENCH / "specs" / "grpo-vs-trl.yaml"
REWARD_FILE = BENCH / "rewards" / "digits.py"
ASYNC = "kuberlhf-async"


def render_spec(
    template: dict[str, Any],
    cfg: common.BenchConfig,
    model: Path,
    prompts: Path,
    weight_sync: str,
    off_policy_steps: int = 0,
) -> dict[str, Any]:
    """The template with every shared path and workload number filled in from `cfg`."""
    doc = json.loads(json.dumps(template))
    spec = doc["spec"]
    spec["model"]["actor"] = str(model)
    spec["reward"]["function"] = f"{REWARD_FILE}:reward"
    spec["data"].update(prompts=str(prompts), maxNewTokens=cfg.max_new_tokens)
    spec["rollout"].update(
        samplesPerPrompt=cfg.samples_per_prompt,
        promptsPerStep=cfg.prompts_per_step,
        temperature=cfg.temperature,
        offPolicySteps=off_policy_steps,
    )
    spec["actor"].update(learningRate=cfg.learning_rate, microBatchSize=cfg.samples_per_step)
    spec["kl"]["coef"] = cfg.beta
    spec["schedule"]["steps"] = cfg.steps
    spec["checkpoint"]["everySteps"] = cfg.steps
    spec["seed"] = cfg.seed
    spec["weightSync"]["transport"] = weight_sync
    return doc


def tree_rss(process: psutil.Process) -> int:
    """RSS of a process and all its descendants (Ray's GCS, raylet and workers included)."""
    total = 0
    try:
        members = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for member in members:
        try:
            total += member.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def stop_tree(process: psutil.Process, grace_s: float = 30) -> None:
    """Stop a child that is still running (timeout, Ctrl-C) and every process it started: SIGTERM
    first (kuberlhf then shuts its private Ray down), SIGKILL for whatever is left after grace_s."""
    try:
        members = [process, *process.children(recursive=True)]
        process.terminate()
    except psutil.NoSuchProcess:
        return
    _, alive = psutil.wait_procs(members, timeout=grace_s)
    for member in alive:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            continue


class LineWatcher:
    """Notes the wall-clock time each new line of a file is first seen (to POLL_S)."""

    def __init__(self, path: Path):
        self.path = path
        self.arrivals: list[float] = []

    def __call__(self) -> None:
        if not self.path.exists():
            return
        now = time.time()
        with self.path.open() as fh:
            complete = sum(1 for line in fh if line.endswith("\n"))
        self.arrivals.extend([now] * (complete - len(self.arrivals)))


def run_measured(
    command: list[str], env: dict[str, str], log: Path, timeout_s: float, on_poll: Callable[[], None]
) -> dict[str, Any]:
    """Start `command`, sample its tree's RSS and call `on_poll` every POLL_S until it exits."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        started = time.time()
        child = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        process = psutil.Process(child.pid)
        peak = 0
        try:
            while child.poll() is None:
                peak = max(peak, tree_rss(process))
                on_poll()
                if time.time() - started > timeout_s:
                    print(
                        f"{command[0]}: still running after {timeout_s:.0f} s; stopping it", file=sys.stderr
                    )
                    break
                time.sleep(POLL_S)
        finally:
            if child.poll() is None:
                stop_tree(process)
        rc = child.wait()
        ended = time.time()
    on_poll()
    return {"rc": rc, "started": started, "wall_s": ended - started, "peak_rss_bytes": peak}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pinned(command: list[str], cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus, *command] if cpus else command


def run_kuberlhf(
    cfg: common.BenchConfig,
    side: Path,
    model: Path,
    prompts: Path,
    cpus: str | None,
    timeout_s: float,
    weight_sync: str,
    off_policy_steps: int = 0,
) -> dict[str, Any]:
    side.mkdir(parents=True, exist_ok=True)
    spec_path = side / "spec.yaml"
    template = yaml.safe_load(SPEC_TEMPLATE.read_text())
    spec_path.write_text(
        yaml.safe_dump(
            render_spec(template, cfg, model, prompts, weight_sync, off_policy_steps), sort_keys=False
        )
    )
    run_dir = side / "run"
    command = [str(ROOT / ".venv" / "bin" / "kuberlhf"), "run", str(spec_path), "--output", str(run_dir)]
    watcher = LineWatcher(run_dir / "metrics.jsonl")
    threads = cfg_threads(cpus)
    record = run_measured(
        pinned([*command, "--quiet", "--no-resume"], cpus),
        common.child_env(threads),
        side / "log.txt",
        timeout_s,
        watcher,
    )
    rows = stats.kuberlhf_steps(
        read_jsonl(run_dir / "metrics.jsonl"), watcher.arrivals, record["started"], cfg.samples_per_step
    )
    latest = run_dir / "checkpoints" / "latest"
    final = run_dir / "checkpoints" / latest.read_text().strip() / "model" if latest.exists() else None
    return {**record, "rows": rows, "log": str(side / "log.txt"), "final_model": final}


def run_trl(
    cfg: common.BenchConfig,
    side: Path,
    model: Path,
    prompts: Path,
    sha: str,
    cpus: str | None,
    timeout_s: float,
) -> dict[str, Any]:
    side.mkdir(parents=True, exist_ok=True)
    config_path = side / "config.json"
    config_path.write_text(json.dumps(cfg.as_dict()))
    threads = cfg_threads(cpus)
    command = [
        str(ROOT / ".venv-bench" / "bin" / "python"),
        str(BENCH / "trl_side.py"),
        *("--model", str(model), "--prompts", str(prompts), "--reward", str(REWARD_FILE)),
        *("--config", str(config_path), "--expect-sha256", sha, "--threads", str(threads)),
        *("--out", str(side)),
    ]
    record = run_measured(
        pinned(command, cpus), common.child_env(threads), side / "log.txt", timeout_s, lambda: None
    )
    rows = stats.trl_steps(read_jsonl(side / "trl_steps.jsonl"), record["started"])
    final = side / "final"
    return {
        **record,
        "rows": rows,
        "log": str(side / "log.txt"),
        "final_model": final if final.is_dir() else None,
    }


def round_order(names: list[str], rounds: int) -> list[tuple[int, str]]:
    """(round, system) in run order: forwards, then backwards, and so on. A machine that drifts
    faster or slower during the benchmark then shifts every system alike instead of the last one."""
    order = []
    for index in range(rounds):
        order.extend((index, name) for name in (names if index % 2 == 0 else names[::-1]))
    return order


def parse_cpus(text: str) -> list[int]:
    """taskset's list syntax ("0-1", "0,2,4-5") as core numbers."""
    cores: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        cores.extend(range(int(low), int(high or low) + 1))
    return cores


def summarise_run(record: dict[str, Any], model: Path, cfg: common.BenchConfig) -> dict[str, Any]:
    final = record["final_model"]
    return {
        "exit_code": record["rc"],
        "log": record["log"],
        "weights_relative_change": common.relative_change(model, final) if final else None,
        **stats.summarise(
            record["rows"],
            record["wall_s"],
            record["peak_rss_bytes"],
            cfg.samples_per_step,
            cfg.warmup_steps_excluded,
        ),
    }


def cfg_threads(cpus: str | None) -> int:
    """Torch threads per system: one per pinned core."""
    return len(parse_cpus(cpus) if cpus else psutil.Process().cpu_affinity())


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps per system (default 20)")
    parser.add_argument("--learning-rate", type=float, default=common.BenchConfig.learning_rate)
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
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    cpus = args.cpus or None
    if cpus and shutil.which("taskset") is None:
        parser.error("taskset (util-linux) is not installed: install it, or pass --cpus '' to run unpinned")
    if cpus and not set(parse_cpus(cpus)) <= set(psutil.Process().cpu_affinity()):
        parser.error(f"--cpus {cpus}: this process may only use cores {psutil.Process().cpu_affinity()}")
    if importlib.util.find_spec("matplotlib") is None:
        parser.error(f"matplotlib is missing from {sys.executable}: run this with .venv-bench/bin/python")
    for needed in (ROOT / ".venv" / "bin" / "kuberlhf", ROOT / ".venv-bench" / "bin" / "python"):
        if not needed.exists():
            parser.error(f"{needed} is missing: run `make bench` (it builds both environments)")

    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    out: Path = (args.out or BENCH / "out" / stamp).resolve()
    cfg = common.BenchConfig(steps=args.steps, learning_rate=args.learning_rate)
    shared = out / "shared"
    model = shared / "model"
    model.mkdir(parents=True, exist_ok=True)
    print(f"building the shared model and prompts in {shared}", flush=True)
    sha = common.build_model(model, cfg)
    prompts = common.write_prompts(shared / "prompts.jsonl", cfg.seed, cfg.prompts)

    runners: dict[str, Callable[[Path], dict[str, Any]]] = {
        "kuberlhf": lambda side: run_kuberlhf(
            cfg, side, model, prompts, cpus, args.timeout, args.weight_sync
        ),
        "trl": lambda side: run_trl(cfg, side, model, prompts, sha, cpus, args.timeout),
        ASYNC: lambda side: run_kuberlhf(
            cfg, side, model, prompts, cpus, args.timeout, args.weight_sync, off_policy_steps=1
        ),
    }
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in runners}
    for index, name in round_order(list(runners), args.rounds):
        print(f"{name}: {cfg.steps} steps (round {index + 1}/{args.rounds}) ...", flush=True)
        record = runners[name](out / name / f"round-{index + 1}")
        rounds[name].append(summarise_run(record, model, cfg))
        if common.weights_sha256(model) != sha:
            raise SystemExit("the shared weights changed during a run; the comparison is void")

    systems = {name: stats.combine_rounds(summaries) for name, summaries in rounds.items()}
    results = {
        "benchmark": "vs_trl",
        "created": stamp,
        "config": cfg.as_dict(),
        "kuberlhf_weight_sync": args.weight_sync,
        "rounds": args.rounds,
        "machine": {"cpus_pinned": cpus, "logical_cpus": psutil.cpu_count(), "threads": cfg_threads(cpus)},
        "model": {"path": str(model), "sha256": sha, "parameters": common.parameter_count(model)},
        "systems": systems,
        "ratios_over_trl": {
            name: stats.ratios(system, systems["trl"]) for name, system in systems.items() if name != "trl"
        },
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "reward_vs_time.png")
    print(summary.table([results]))
    print(f"\nresults: {out / 'results.json'}\nplot:    {out / 'reward_vs_time.png'}")
    failed = [
        name for name, summaries in rounds.items()
        if any(s["exit_code"] != 0 or s["steps_done"] != cfg.steps for s in summaries)
    ]
    if failed:
        print(f"incomplete: {', '.join(failed)} (see the logs above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
