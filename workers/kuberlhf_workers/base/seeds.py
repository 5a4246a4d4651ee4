"""The one way seeds are derived: a run's seed mixed with where a random stream is used.

Every random stream (the prompt order of an epoch, one engine's sampling at one step, one
prompt's vLLM request) gets its own seed from the spec's seed and its coordinates, so a resumed
run draws exactly what an unbroken one would, and no two streams share a seed by accident.
"""

from __future__ import annotations

MODULUS = 2**31 - 1  # fits every consumer: torch, random, vLLM's SamplingParams (int32)
_SEED_WEIGHT = 1_000_003
_PART_WEIGHTS = (7_919, 104_729, 1_299_709)


def mix_seed(seed: int, *parts: int) -> int:
    """A seed for the stream at coordinates `parts` (at most three, for example step and engine)."""
    if len(parts) > len(_PART_WEIGHTS):
        raise ValueError(f"mix_seed takes at most {len(_PART_WEIGHTS)} coordinates, got {len(parts)}")
    value = seed * _SEED_WEIGHT + sum(p * w for p, w in zip(parts, _PART_WEIGHTS, strict=False))
    return value % MODULUS
