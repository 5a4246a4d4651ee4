"""User environments for multi-turn rollouts: loading `spec.environment.class` and calling it safely.

An environment is user code that runs inside a rollout engine's actor, one instance per episode.
Like a reward function it is the likeliest thing to be wrong, and unlike one it may also block (a
sandbox behind HTTP), so every call runs on a daemon thread of its own with a deadline: a call that
raises, hangs or returns the wrong shape fails its episode with an `EpisodeFailed`, never the
engine, and a hung call is abandoned rather than waited for (a thread cannot be killed).
"""

from __future__ import annotations

import asyncio
import inspect
import math
import numbers
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kuberlhf_workers.base.userfiles import load_target

FIELD = "spec.environment.class"
DEFAULT_MAX_TURNS = 4

Step = tuple[str | None, float, bool]


class EpisodeFailed(RuntimeError):
    """One episode's environment raised, timed out or returned something malformed."""


def load_environment_class(ref: str, spec_dir: Path) -> type:
    """Load "file.py:ClassName" (relative to the spec file's folder, then sys.path) or "module:ClassName"."""
    module, attr, where = load_target(ref, spec_dir, FIELD, "ClassName")
    cls = getattr(module, attr, None)
    if not isinstance(cls, type):
        classes = sorted(n for n, v in vars(module).items() if isinstance(v, type) and not n.startswith("_"))
        raise ValueError(f"{FIELD}: {where} has no class {attr!r} (classes defined there: {classes})")
    missing = [m for m in ("reset", "step") if not callable(getattr(cls, m, None))]
    if missing:
        raise ValueError(f"{FIELD}: {attr} in {where} lacks {', '.join(missing)}(); see the Env interface")
    return cls


def max_turns(cls: type, cap: int | None) -> int:
    """spec.environment.maxTurns, else the class's own max_turns."""
    if cap is not None:
        return cap
    turns = getattr(cls, "max_turns", DEFAULT_MAX_TURNS)
    if not isinstance(turns, int) or isinstance(turns, bool) or turns < 1:
        raise ValueError(f"{FIELD}: {cls.__name__}.max_turns must be a positive int, got {turns!r}")
    return turns


def call_all(calls: Sequence[Callable[[], Any]], timeout_s: float, what: str) -> list[Any]:
    """Run every call at once, each on its own daemon thread (an `async def` result is awaited
    there), and wait at most `timeout_s` for all of them. Each slot holds the call's result or the
    `EpisodeFailed` it ended with."""
    results: list[Any] = [EpisodeFailed(f"{what} timed out after {timeout_s:g}s")] * len(calls)

    def run(i: int, call: Callable[[], Any]) -> None:
        try:
            value = call()
            if inspect.isawaitable(value):
                value = asyncio.run(_awaited(value))
            results[i] = value
        except Exception as exc:
            results[i] = EpisodeFailed(f"{what} raised {type(exc).__name__}: {exc}")

    threads = [
        threading.Thread(target=run, args=(i, c), daemon=True, name=f"env-{i}") for i, c in enumerate(calls)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    # A copy: an abandoned call that finishes later must not change what this step saw.
    return list(results)


async def _awaited(value: Any) -> Any:
    return await value


def checked_reset(value: Any, who: str) -> str:
    if isinstance(value, EpisodeFailed):
        raise value
    if not isinstance(value, str):
        raise EpisodeFailed(f"{who}.reset() must return a str (\"\" for none), got {type(value).__name__}")
    return value


def checked_step(value: Any, who: str) -> Step:
    """(observation or None, finite reward, done) from a step's result, or EpisodeFailed saying
    what is wrong with it."""
    if isinstance(value, EpisodeFailed):
        raise value
    shape = "(observation: str | None, reward: float, done: bool)"
    if not isinstance(value, tuple | list) or len(value) != 3:
        raise EpisodeFailed(f"{who}.step() must return {shape}, got {_short(value)}")
    observation, reward, done = value
    if observation is not None and not isinstance(observation, str):
        raise EpisodeFailed(
            f"{who}.step() returned observation {_short(observation)}; expected a str or None"
        )
    if isinstance(reward, bool) or not isinstance(reward, numbers.Real) or not math.isfinite(float(reward)):
        raise EpisodeFailed(f"{who}.step() returned reward {_short(reward)}; expected a finite number")
    if not isinstance(done, bool):
        raise EpisodeFailed(f"{who}.step() returned done {_short(done)}; expected a bool")
    return observation, float(reward), done


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
