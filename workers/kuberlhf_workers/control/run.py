"""`kuberlhf run FILE`: train one RLHFJob spec, locally on CPU or inside a RayJob.

Exit codes: 0 when every step is trained (or a checkpoint says they already were, which is
said out loud), 1 for a bad spec, 3 when training failed part-way (a trainer died, a worker
or the reward timed out: rerunning resumes from the last checkpoint, which is what a RayJob's
retry does), 130 when Ctrl-C, SIGTERM or a terminating pod (kuberlhf.shutdown) stopped the run
after a checkpoint.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import yaml

from kuberlhf import api, engine_choice, jobrefs, shutdown
from kuberlhf.specfile import load_job
from kuberlhf_workers.control.report import SPEC

if TYPE_CHECKING:
    from kuberlhf_workers.control.driver import Outcome
    from kuberlhf_workers.control.metrics import ProgressCallback


class Program(Protocol):
    """What `kuberlhf run` needs of a controller program (the RL driver, the offline one)."""

    on_ray_started: Callable[[], None] | None
    on_stopped: Callable[[], None] | None
    last_checkpoint: str | None

    def __init__(
        self,
        job: api.RLHFJob,
        spec_dir: Path,
        output_dir: Path,
        *,
        max_steps: int | None = ...,
        ray_address: str = ...,
        resume: bool = ...,
        callbacks: Sequence[ProgressCallback] = ...,
    ) -> None: ...

    def request_stop(self) -> None: ...

    def run(self) -> Outcome: ...

TRAINING_FAILED = 3


def _rl_program() -> type[Program]:
    from kuberlhf_workers.control.driver import Driver

    return Driver


def _offline_program() -> type[Program]:
    from kuberlhf_workers.control.offline import OfflineDriver

    return OfflineDriver


# The controller program that trains each kind of algorithm (`api.ALGORITHMS[...].program`).
PROGRAMS: dict[api.Program, Callable[[], type[Program]]] = {"rl": _rl_program, "offline": _offline_program}


def output_dir(job_name: str, requested: str | None) -> Path:
    return Path(requested) if requested else Path("runs") / job_name


def _quiet_environment() -> None:
    for key, value in {
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "RAY_DEDUP_LOGS": "0",
    }.items():
        os.environ.setdefault(key, value)


# Where a container's memory limit is written: cgroup v2, then v1 (which says "no limit" with a huge number).
CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def host_memory(
    meminfo: Path = Path("/proc/meminfo"), cgroups: Sequence[Path] = CGROUP_LIMITS
) -> tuple[float, str]:
    """The memory this run's processes may use, in bytes, and whose limit it is: the machine's total,
    or a container's cgroup limit when that is lower (a pod's memory limit)."""
    total, source = float("inf"), "this machine"
    for line in meminfo.read_text().splitlines() if meminfo.is_file() else []:
        if line.startswith("MemTotal:"):
            total = float(line.split()[1]) * 1024
    for path in cgroups:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and float(text) < total:
            total, source = float(text), f"the container's memory limit ({path})"
    return total, source


def warn_host_memory(spec: api.RLHFJobSpec, ray_address: str) -> None:
    """Before a local CPU run starts: say so when its trainer ranks would not fit in this host's
    memory (the kernel would kill a rank part-way instead), with the change that would fit."""
    import torch

    from kuberlhf.memory import host_memory_problem
    from kuberlhf.modelsize import model_shape

    if ray_address != "local" or torch.cuda.is_available():
        return
    available, source = host_memory()
    problem = host_memory_problem(spec, model_shape(spec.model.actor, spec.model.size), available, source)
    if problem is not None:
        print(f"warning: {problem}", file=sys.stderr, flush=True)


def main(args: argparse.Namespace, extra_callbacks: list[Any] | None = None) -> int:
    _quiet_environment()
    path = Path(args.file)
    try:
        job = load_job(path)
    except api.SpecError as exc:
        for problem in exc.problems:
            print(f"{path}: {problem}", file=sys.stderr)
        return 1
    if args.max_steps is not None and args.max_steps < 1:
        print(f"--max-steps: must be at least 1, got {args.max_steps}", file=sys.stderr)
        return 1

    from kuberlhf_workers.control.faults import StepFailed
    from kuberlhf_workers.control.metrics import JsonlWriter, PrintProgress, RichProgress, TensorBoardWriter
    from kuberlhf_workers.control.status_reporter import from_environment
    from kuberlhf_workers.control.tracking import RunStatus, run_status, start_tracking

    out = output_dir(job.metadata.name, args.output)
    try:  # job:<name> models: that job's final model, beside this job's output folder
        problems = jobrefs.ref_problems(job.spec, job.metadata.name)
        if problems:
            raise ValueError("; ".join(problems))
        job = job.model_copy(update={"spec": jobrefs.resolve(job.spec, out.parent)})
        if api.ALGORITHMS[job.spec.algorithm].online:  # rollout.engine: auto made concrete, once
            spec, choice = engine_choice.resolve(job.spec, args.max_steps)
            print(choice.describe(job.spec.rollout.engine), flush=True)
            job = job.model_copy(update={"spec": spec})
        from kuberlhf_workers.base.precision import resolve_cpu_run

        spec, picked = resolve_cpu_run(job.spec)  # precision: auto made concrete on CPUs, once
        if picked is not None:
            print(picked.describe(job.spec.precision), flush=True)
            job = job.model_copy(update={"spec": spec})
    except ValueError as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    # The spec as run (defaults filled in, job: models and rollout.engine resolved): for the report
    # and for whoever wonders later what this folder was trained with. It holds Secret references,
    # never values.
    document = {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": job.metadata.name},
                "spec": api.spec_to_dict(job.spec)}
    (out / SPEC).write_text(yaml.safe_dump(document, sort_keys=False))
    try:  # tracking.mlflow: the client and the store are checked before anything starts
        tracker = start_tracking(job, out, resume=not args.no_resume)
    except ValueError as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return 1
    tensorboard = TensorBoardWriter(out / "tensorboard")
    display: Any = PrintProgress() if args.quiet or not sys.stdout.isatty() else RichProgress()
    callbacks = [JsonlWriter(out / "metrics.jsonl"), tensorboard, display, *(extra_callbacks or [])]
    if tracker is not None:
        callbacks.append(tracker)
    reporter = from_environment()  # inside a RayJob: progress into the RLHFJob's status
    if reporter is not None:
        callbacks.append(reporter)
    warn_host_memory(job.spec, args.ray_address)
    program = PROGRAMS[api.ALGORITHMS[job.spec.algorithm].program]()
    driver = program(
        job,
        path.parent,
        out,
        max_steps=args.max_steps,
        ray_address=args.ray_address,
        resume=not args.no_resume,
        callbacks=callbacks,
    )

    def stop(signum: int, frame: Any) -> None:
        print(
            f"\n{signal.Signals(signum).name}: stopping after this step (a checkpoint will be saved); "
            "Ctrl-C again to abort",
            file=sys.stderr,
            flush=True,
        )
        signal.signal(signal.SIGINT, signal.default_int_handler)
        driver.request_stop()

    def catch_stop_signals() -> None:
        # SIGTERM is how Kubernetes stops a pod (suspend, preemption): checkpoint, then exit.
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

    def pod_terminating() -> None:
        print("a pod of this job is terminating: stopping after this step (a checkpoint will be saved)",
              file=sys.stderr, flush=True)
        driver.request_stop()

    # In a RayJob the pods' preStop hooks ask for the stop and wait for the checkpoint (kuberlhf.shutdown).
    lease = shutdown.RunLease(out, job.spec.termination_grace_period_seconds, pod_terminating)

    def stopped() -> None:
        lease.release(driver.last_checkpoint)
        # The checkpoint is published and the hooks let the pods go: their SIGTERM may now end this
        # process at once, as it ends every other process of the pod.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    driver.on_ray_started = catch_stop_signals
    driver.on_stopped = stopped
    previous = signal.signal(signal.SIGINT, stop)
    previous_term = signal.signal(signal.SIGTERM, stop)
    ended: RunStatus = "FAILED"  # the MLflow run's end, unless an outcome (or a kill) says otherwise
    try:
        if lease.previous_driver_deadline() is not None:
            print(f"{job.metadata.name}: waiting for the previous run's driver to save its checkpoint",
                  file=sys.stderr, flush=True)
        lease.acquire()
        outcome = driver.run()
        ended = run_status(outcome.status)
    except KeyboardInterrupt:  # the second Ctrl-C
        ended = "KILLED"
        raise
    except ValueError as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return 1
    except StepFailed as exc:
        print(f"{job.metadata.name}: training failed: {exc}", file=sys.stderr, flush=True)
        return TRAINING_FAILED
    finally:
        lease.release(driver.last_checkpoint)
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)
        tensorboard.close()
        if tracker is not None:
            tracker.end(ended)
        if reporter is not None:
            reporter.close()
        if isinstance(display, RichProgress):
            display.close()
    report = _write_report(out)
    if outcome.status == "already-complete":
        print(
            f"{job.metadata.name}: already complete at step {outcome.step}/{outcome.total_steps} "
            f"(checkpoint {outcome.last_checkpoint}); nothing to train. Use --no-resume to start over."
        )
        return 0
    if outcome.status == "interrupted":
        print(
            f"{job.metadata.name}: stopped at step {outcome.step}/{outcome.total_steps}; "
            f"checkpoint {outcome.last_checkpoint}. Run the same command again to resume."
        )
        return 130
    print(
        f"{job.metadata.name}: done, {outcome.step} steps; model in "
        f"{outcome.model or f'{outcome.last_checkpoint}/model'}, "
        f"metrics in {out / 'metrics.jsonl'}" + (f", report in {report}" if report else "")
    )
    return 0


def _write_report(out: Path) -> Path | None:
    """OUTPUT/report.html from what the run wrote; a report that cannot be drawn never fails a run."""
    from kuberlhf_workers.control.report import write_report

    if not (out / "metrics.jsonl").is_file():
        return None
    try:
        return write_report(out)
    except (OSError, ValueError, ImportError) as exc:
        print(f"report not written: {exc}", file=sys.stderr)
        return None
