"""Prompt mixing (`spec.data.promptMix`): each prompt is drawn from one of several sources with
probability weight / (sum of weights), and each source keeps its own seeded epoch-wise order.

The source of the k-th draw of a run is a pure function of (seed, k) (a counter-based draw, not a
random generator whose state would have to be saved), so the mix's whole position is the number of
draws plus every source's (epoch, position): a checkpoint resumes the exact prompt stream, and a
step whose rollout is regenerated draws the same prompts again.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kuberlhf.api import DataSpec
from kuberlhf_workers.base.data import PromptSampler, PromptStream, load_prompts, load_source
from kuberlhf_workers.base.seeds import mix_seed

FIELD = "spec.data.promptMix"
DRAWS = "draws"
_UNIT = float(2**64)


def draw_point(seed: int, draw: int) -> float:
    """A uniform number in [0, 1) for draw `draw` of a run seeded `seed`, the same on every machine."""
    digest = hashlib.blake2b(f"{seed}:{draw}".encode(), digest_size=8, person=b"kuberlhf-mix").digest()
    return int.from_bytes(digest, "big") / _UNIT


def source_of(seed: int, draw: int, cumulative: list[float]) -> int:
    """Which source draw `draw` takes, given the sources' cumulative weights."""
    return min(bisect.bisect_right(cumulative, draw_point(seed, draw) * cumulative[-1]), len(cumulative) - 1)


class PromptMix:
    """A weighted mix of prompt sources behind PromptSampler's interface (PromptStream)."""

    def __init__(self, sources: list[tuple[list[dict[str, Any]], float]], seed: int, shuffle: bool = True):
        if not sources:
            raise ValueError(f"{FIELD}: no prompt sources to mix")
        for index, (_, weight) in enumerate(sources):
            if not weight > 0:
                raise ValueError(f"{FIELD}.{index}.weight: must be greater than 0, got {weight}")
        # Each source's epochs are shuffled with a seed of its own, so two sources holding the same
        # file are not walked in lockstep.
        self._samplers = [
            PromptSampler(records, mix_seed(seed, index + 1, 1), shuffle)
            for index, (records, _) in enumerate(sources)
        ]
        self._cumulative = list(itertools.accumulate(weight for _, weight in sources))
        self._seed = seed
        self._draws = 0

    def __len__(self) -> int:
        return sum(len(s) for s in self._samplers)

    def next_batch(self, n: int) -> list[dict[str, Any]]:
        if n < 1:
            raise ValueError(f"batch size must be at least 1, got {n}")
        choices = [source_of(self._seed, self._draws + i, self._cumulative) for i in range(n)]
        taken = [iter(s.next_batch(choices.count(i))) if i in choices else iter(()) for i, s in
                 enumerate(self._samplers)]
        self._draws += n
        return [next(taken[i]) for i in choices]

    def state(self) -> dict[str, int]:
        out = {DRAWS: self._draws}
        for index, sampler in enumerate(self._samplers):
            out.update({f"{key}.{index}": value for key, value in sampler.state().items()})
        return out

    def load_state(self, state: dict[str, int]) -> None:
        keys = ("epoch", "position")
        expected = {DRAWS, *(f"{key}.{i}" for i in range(len(self._samplers)) for key in keys)}
        if set(state) != expected or int(state[DRAWS]) < 0:
            raise ValueError(
                f"sampler state {sorted(state)} does not fit a mix of {len(self._samplers)} prompt sources "
                "(was the checkpoint made with a different data.promptMix?)"
            )
        for index, sampler in enumerate(self._samplers):
            sampler.load_state({key: int(state[f"{key}.{index}"]) for key in keys})
        self._draws = int(state[DRAWS])


def open_prompts(
    data: DataSpec, spec_dir: Path, seed: int, chat: Callable[[Any], str] | None = None
) -> PromptStream:
    """The run's prompt stream: data.promptMix when set, else the single source data.prompts (whose
    sampler state keeps its two-integer form, so its checkpoints stay as they were)."""
    if data.prompt_mix is None:
        return PromptSampler(load_prompts(data, spec_dir, chat), seed, data.shuffle)
    key, cap = data.prompt_key, data.max_samples
    sources = [
        (load_source(s.path, key, spec_dir, chat, f"{FIELD}.{i}.path", cap), s.weight)
        for i, s in enumerate(data.prompt_mix)
    ]
    return PromptMix(sources, seed, data.shuffle)
