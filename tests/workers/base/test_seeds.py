"""One seed-mixing rule for every random stream of a run."""

from __future__ import annotations

import pytest

from kuberlhf_workers.base.seeds import MODULUS, mix_seed

pytestmark = pytest.mark.unit


def test_streams_at_different_coordinates_get_different_seeds_within_int32() -> None:
    seeds = {mix_seed(42, step, engine) for step in range(200) for engine in range(8)}
    assert len(seeds) == 200 * 8
    assert all(0 <= s < MODULUS for s in seeds)
    assert mix_seed(42, 3) != mix_seed(43, 3)
    assert mix_seed(42, 1, 0) != mix_seed(42, 0, 1), "coordinates are not interchangeable"


def test_the_same_coordinates_always_give_the_same_seed() -> None:
    assert mix_seed(7, 5, 2) == mix_seed(7, 5, 2) == (7 * 1_000_003 + 5 * 7_919 + 2 * 104_729) % MODULUS


def test_more_coordinates_than_weights_are_refused() -> None:
    with pytest.raises(ValueError, match="at most 3"):
        mix_seed(1, 1, 2, 3, 4)
