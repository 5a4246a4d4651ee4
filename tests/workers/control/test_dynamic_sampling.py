"""Dynamic sampling's pure selection: which groups a step trains, in which order, and the refill loop."""

from __future__ import annotations

import pytest

from kuberlhf_workers.base.samples import GenerationResult
from kuberlhf_workers.control.dynamic_sampling import (
    Round,
    Selection,
    fill_batch,
    has_variance,
    select_groups,
    take_groups,
)


def _result(tags: list[str]) -> GenerationResult:
    """One row per tag, every column carrying it, so a picked row shows where it came from."""
    return GenerationResult(
        prompts=[f"p-{t}" for t in tags],
        responses=[f"r-{t}" for t in tags],
        prompt_ids=[[i] for i in range(len(tags))],
        response_ids=[[i, i] for i in range(len(tags))],
        response_logprobs=[[-0.5, -0.5] for _ in tags],
        finished=[True] * len(tags),
        episode_rewards=[float(i) for i in range(len(tags))],
    )


def test_a_group_has_variance_when_any_two_of_its_rewards_differ() -> None:
    assert has_variance([1, 1, 1, 0, 1, 1, 0.5, 0.5, 0.5], 3) == [False, True, False]
    with pytest.raises(ValueError, match="groups of 4"):
        has_variance([1.0, 0.0, 1.0], 4)


def test_the_first_varied_groups_are_kept_in_draw_order_and_the_rest_left_out() -> None:
    varied = [False, True, True, False, True, True]
    assert select_groups(varied, wanted=3, final=False) == Selection([1, 2, 4], dropped=2, filled=0)


def test_too_few_varied_groups_ask_for_another_round_until_the_last() -> None:
    varied = [True, False, False, True, False]
    assert select_groups(varied, wanted=3, final=False) is None
    # The last round fills the batch with the first dropped groups, kept in draw order.
    assert select_groups(varied, wanted=3, final=True) == Selection([0, 1, 3], dropped=3, filled=1)


def test_take_groups_keeps_every_column_of_a_groups_rows_aligned() -> None:
    result = _result(["a0", "a1", "b0", "b1", "c0", "c1"])
    picked = take_groups(result, [0, 2], samples_per_prompt=2)
    assert picked.prompts == ["p-a0", "p-a1", "p-c0", "p-c1"]
    assert picked.responses == ["r-a0", "r-a1", "r-c0", "r-c1"]
    assert picked.prompt_ids == [[0], [1], [4], [5]] and picked.episode_rewards == [0.0, 1.0, 4.0, 5.0]
    assert picked.loss_mask is None, "an absent column stays absent"


def _rounds(rewards_per_round: list[list[float]], spp: int) -> list[Round]:
    rounds = []
    for r, rewards in enumerate(rewards_per_round):
        groups = len(rewards) // spp
        tags = [f"{r}.{g}.{j}" for g in range(groups) for j in range(spp)]
        records = [{"prompt": f"{r}.{g}"} for g in range(groups)]
        rounds.append(Round(records, _result(tags), rewards, {"epoch": 0, "position": r * groups}))
    return rounds


def test_fill_batch_draws_rounds_until_enough_groups_vary_and_trains_only_those() -> None:
    # Groups of two: flat, varied, flat | varied, flat, varied.
    rounds = _rounds([[1, 1, 0, 1, 0, 0], [1, 0, 1, 1, 0, 1]], spp=2)
    asked: list[int] = []

    def generate(r: int) -> Round:
        asked.append(r)
        return rounds[r]

    batch = fill_batch(generate, wanted=3, samples_per_prompt=2, max_rounds=4)
    assert asked == [0, 1], "stops as soon as the batch is full"
    assert [r["prompt"] for r in batch.records] == ["0.1", "1.0", "1.2"]
    assert batch.result.responses == ["r-0.1.0", "r-0.1.1", "r-1.0.0", "r-1.0.1", "r-1.2.0", "r-1.2.1"]
    assert batch.rewards == [0, 1, 1, 0, 0, 1]
    assert batch.sampler_before == {"epoch": 0, "position": 0}, "a resume redraws from the first round"
    assert batch.metrics["dynamic_rounds"] == 2 and batch.metrics["dynamic_groups_dropped"] == 3
    assert batch.metrics["dynamic_groups_filled"] == 0 and batch.metrics["time_dynamic_extra_s"] >= 0


def test_fill_batch_after_max_rounds_trains_a_full_batch_and_counts_the_flat_groups_filled_in() -> None:
    rounds = _rounds([[1, 1, 0, 1], [0, 0, 1, 1]], spp=2)  # flat varied | flat flat
    batch = fill_batch(lambda r: rounds[r], wanted=2, samples_per_prompt=2, max_rounds=2)
    assert [r["prompt"] for r in batch.records] == ["0.0", "0.1"]
    assert batch.metrics == pytest.approx(
        {"dynamic_rounds": 2, "dynamic_groups_dropped": 3, "dynamic_groups_filled": 1,
         "time_dynamic_extra_s": batch.metrics["time_dynamic_extra_s"]}
    )


def test_fill_batch_is_deterministic_for_the_same_scores() -> None:
    rewards = [[0, 0, 1, 0, 1, 1], [0, 1, 1, 1, 0, 1], [1, 0, 0, 0, 0, 0]]
    first = fill_batch(lambda r: _rounds(rewards, 2)[r], wanted=3, samples_per_prompt=2, max_rounds=3)
    again = fill_batch(lambda r: _rounds(rewards, 2)[r], wanted=3, samples_per_prompt=2, max_rounds=3)
    assert first.records == again.records and first.result == again.result
    assert [r["prompt"] for r in first.records] == ["0.1", "1.0", "1.2"]
