"""Per-step metrics: a JSONL file, TensorBoard event files, and the live progress line.

All three are progress callbacks with the driver's one signature,
`callback(step, total, metrics, last_checkpoint)`, like the Kubernetes status reporter.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Protocol

REQUIRED_KEYS = (
    "step",
    "reward_mean",
    "reward_std",
    "kl",
    "policy_loss",
    "response_length_mean",
    "samples_per_second",
    "time_rollout_s",
    "time_reward_s",
    "time_train_s",
    "time_sync_s",
)


class ProgressCallback(Protocol):
    def __call__(
        self, step: int, total: int, metrics: dict[str, float], last_checkpoint: str | None
    ) -> None: ...


def _clean(metrics: dict[str, Any]) -> dict[str, Any]:
    """JSON cannot hold NaN / inf; write null so every line stays parseable."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


class JsonlWriter:
    """One JSON object per step; appends, so a resumed run continues the same file.

    A run that crashed after its last checkpoint redoes those steps when it resumes: their old
    rows are dropped on the first write, so every step appears once, as finally trained.
    """

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._trimmed = False

    def _drop_rows_from(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] < step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def __call__(self, step: int, total: int, metrics: dict[str, float], last_checkpoint: str | None) -> None:
        if not self._trimmed:
            self._drop_rows_from(step)
            self._trimmed = True
        with self.path.open("a") as f:
            # `time`: wall-clock seconds when the step ended, so runs can be lined up against others.
            row = {"step": step, "time": round(time.time(), 3), **metrics}
            f.write(json.dumps(_clean(row), sort_keys=True) + "\n")


class TensorBoardWriter:
    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def __call__(self, step: int, total: int, metrics: dict[str, float], last_checkpoint: str | None) -> None:
        for key, value in metrics.items():
            if isinstance(value, int | float):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def summary_line(step: int, total: int, metrics: dict[str, float]) -> str:
    if "reward_mean" not in metrics and "loss" in metrics:  # an offline run
        keys = ("eval_loss", "eval_accuracy", "eval_reward_accuracy", "eval_reward_margin")
        shown = " ".join(f"{k.removeprefix('eval_')} {metrics[k]:.3f}" for k in keys if k in metrics)
        evals = f"  eval {shown}" if shown else ""
        return (
            f"step {step}/{total}  loss {metrics['loss']:.4f}{evals}  "
            f"{metrics.get('samples_per_second', float('nan')):.1f} samples/s"
        )
    return (
        f"step {step}/{total}  reward {metrics.get('reward_mean', float('nan')):.3f}  "
        f"kl {metrics.get('kl', float('nan')):.4f}  "
        f"{metrics.get('samples_per_second', float('nan')):.1f} samples/s  "
        f"(rollout {metrics.get('time_rollout_s', 0):.2f}s reward {metrics.get('time_reward_s', 0):.2f}s "
        f"train {metrics.get('time_train_s', 0):.2f}s sync {metrics.get('time_sync_s', 0):.2f}s)"
    )


class PrintProgress:
    """--quiet: one plain log line per step (also what a RayJob's log shows)."""

    def __call__(self, step: int, total: int, metrics: dict[str, float], last_checkpoint: str | None) -> None:
        print(summary_line(step, total, metrics), flush=True)


class RichProgress:
    """A live bar with step, reward, KL and samples/s; printed lines keep the reward history visible."""

    def __init__(self, total: int | None = None, start: int = 0):
        """`total` may be unknown until the run has read its data: each step's call sets it."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
        )
        self.task = self.progress.add_task("train", total=total, completed=start, info="starting")
        self.progress.start()

    def __call__(self, step: int, total: int, metrics: dict[str, float], last_checkpoint: str | None) -> None:
        info = f"loss {metrics.get('loss', float('nan')):.4f}" if "reward_mean" not in metrics else (
            f"reward {metrics.get('reward_mean', float('nan')):.3f}  "
            f"kl {metrics.get('kl', float('nan')):.4f}  "
            f"{metrics.get('samples_per_second', float('nan')):.1f} samples/s"
        )
        self.progress.update(self.task, completed=step, total=total, info=info)
        self.progress.console.print(summary_line(step, total, metrics), highlight=False)

    def close(self) -> None:
        self.progress.stop()
