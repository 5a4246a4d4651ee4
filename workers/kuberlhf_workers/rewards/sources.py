"""Turning `spec.reward` into one callable, and guarding training against bad reward code.

Whatever the source (a user's Python function, a remote reward server, a reward model), the
driver sees `fn(prompts, completions, **extra_columns) -> list[float]`. User code is the most
likely thing to be wrong, so loading reports exactly which part of the reference is broken,
and `score` checks every result before a NaN or a short list can poison an update.

Load reward functions where they run (inside the Ray actor): a function from a file loaded here
lives in a module other processes cannot import, so it should not be pickled across.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kuberlhf.api import Precision, RewardSource, RewardSpec
from kuberlhf_workers.base.userfiles import load_target
from kuberlhf_workers.rewards.client import BATCH_SIZE, CONCURRENCY, MAX_BACKOFF_S, RewardClient

RewardFn = Callable[..., list[float]]
FIELD = "spec.reward.function"


class RewardFunctionError(RuntimeError):
    """The reward function failed or returned something training cannot use."""


def load_reward_function(ref: str, spec_dir: Path) -> RewardFn:
    """Load "file.py:fn" (relative to the spec file's directory) or "package.module:fn"."""
    module, attr, where = load_target(ref, spec_dir, FIELD, "function")
    if not hasattr(module, attr):
        defined = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ValueError(f"{FIELD}: {where} has no function {attr!r} (callables defined there: {defined})")
    fn = getattr(module, attr)
    if not callable(fn):
        raise ValueError(f"{FIELD}: {attr!r} in {where} is a {type(fn).__name__}, not a function")
    return fn


@dataclass(frozen=True)
class LoadContext:
    """Where a reward source is loaded: the spec's folder, the server token, the actor's device and
    the job's precision (a reward model's compute dtype)."""

    spec_dir: Path
    secret_token: str | None = None
    device: str = "cpu"
    precision: Precision = "fp32"


def _function(reward: RewardSpec, at: LoadContext) -> RewardFn:
    assert reward.function is not None
    return load_reward_function(reward.function, at.spec_dir)


def _url(reward: RewardSpec, at: LoadContext) -> RewardFn:
    assert reward.url is not None
    return RewardClient(
        url=reward.url,
        timeout_s=reward.timeout_seconds,
        max_retries=reward.max_retries,
        token=at.secret_token,
    )


def _model(reward: RewardSpec, at: LoadContext) -> RewardFn:
    from kuberlhf_workers.base.builtin import resolve_model
    from kuberlhf_workers.rewards.model import RewardModelScorer

    assert reward.model is not None
    path = resolve_model(reward.model, field="spec.reward.model")
    return RewardModelScorer(path, device=at.device, precision=at.precision)


@dataclass(frozen=True)
class RewardSourceKind:
    """How to load one kind of reward source, and whether scoring calls a server (batched
    requests with retries and backoff, so a step's scoring may take several request timeouts)."""

    load: Callable[[RewardSpec, LoadContext], RewardFn]
    remote: bool


REWARD_SOURCES: dict[RewardSource, RewardSourceKind] = {
    "function": RewardSourceKind(_function, remote=False),
    "url": RewardSourceKind(_url, remote=True),
    "model": RewardSourceKind(_model, remote=False),
}


def the_source(reward: RewardSpec) -> RewardSource:
    """The one source a reward spec sets, or a ValueError naming the field."""
    chosen = reward.sources()
    if len(chosen) != 1:
        raise ValueError(f"spec.reward: set exactly one of function, model or url (got {chosen or 'none'})")
    return chosen[0]


def describe_reward(reward: RewardSpec) -> str:
    """How errors name the reward: "reward function 'digits.py:reward'", "reward url '...'"."""
    source = the_source(reward)
    return f"reward {source} {getattr(reward, source)!r}"


def reward_budget_s(reward: RewardSpec, rows: int) -> float:
    """How long scoring one step may take: every attempt of every request timing out, plus the
    backoff between attempts. A reward server gets its batches in waves of concurrent requests."""
    per_request = reward.timeout_seconds * (reward.max_retries + 1)
    if not REWARD_SOURCES[the_source(reward)].remote:
        return per_request
    waves = math.ceil(math.ceil(rows / BATCH_SIZE) / CONCURRENCY)
    return waves * (per_request + reward.max_retries * MAX_BACKOFF_S)


def make_reward_fn(
    reward: RewardSpec,
    spec_dir: Path,
    secret_token: str | None = None,
    device: str = "cpu",
    precision: Precision = "fp32",
) -> RewardFn:
    """The one callable for whichever reward source the spec names."""
    context = LoadContext(spec_dir, secret_token, device, precision)
    return REWARD_SOURCES[the_source(reward)].load(reward, context)


def describe(fn: Callable[..., Any]) -> str:
    module = getattr(fn, "__module__", None)
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    return f"{module}.{name}" if module else name


def score(
    fn: RewardFn, prompts: list[str], completions: list[str], extra: dict[str, list[Any]] | None = None
) -> list[float]:
    """Call the reward function and return its scores as floats, or fail naming the function."""
    who = f"reward function {describe(fn)}"
    extra = extra or {}
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
    for column, values in extra.items():
        if len(values) != len(completions):
            raise ValueError(
                f"extra column {column!r} has {len(values)} values for {len(completions)} completions"
            )
    try:
        result = fn(prompts, completions, **extra)
    except Exception as exc:
        raise RewardFunctionError(f"{who} raised {type(exc).__name__}: {exc}") from exc
    if hasattr(result, "tolist"):  # numpy arrays and torch tensors
        result = result.tolist()
    if not isinstance(result, list | tuple):
        raise RewardFunctionError(f"{who} must return a list of floats, got {type(result).__name__}")
    if len(result) != len(completions):
        raise RewardFunctionError(f"{who} returned {len(result)} scores for {len(completions)} completions")
    scores: list[float] = []
    for index, value in enumerate(result):
        if not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            raise RewardFunctionError(
                f"{who} returned {value!r} at index {index}; every score must be a finite number"
            )
        scores.append(float(value))
    return scores
