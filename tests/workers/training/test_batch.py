"""Pure engine glue: rollouts to padded tensors, log-prob alignment, and batch arithmetic checks."""

from __future__ import annotations

import pytest
import torch

from kuberlhf.api import TrainerSpec
from kuberlhf_workers.base.samples import GenerationResult, merge_results, shard
from kuberlhf_workers.training.batch import collate, token_logprobs
from kuberlhf_workers.training.layout import train_layout

pytestmark = pytest.mark.unit

PAD = 0


def _result() -> GenerationResult:
    return GenerationResult(
        prompts=["a", "bb"],
        responses=["x", "yz"],
        prompt_ids=[[5], [6, 7]],
        response_ids=[[8], [9, 10]],
        response_logprobs=[[-0.5], [-0.25, -0.75]],
        finished=[True, False],
    )


def test_collate_left_pads_prompts_and_right_pads_responses_so_responses_share_a_column():
    batch = collate(_result(), PAD)
    assert batch.prompt_len == 2
    assert batch.input_ids.tolist() == [[PAD, 5, 8, PAD], [6, 7, 9, 10]]
    assert batch.attention_mask.tolist() == [[0, 1, 1, 0], [1, 1, 1, 1]]
    assert batch.position_ids[0, 1:3].tolist() == [0, 1] and batch.position_ids[1].tolist() == [0, 1, 2, 3]
    assert batch.response_mask.tolist() == [[1.0, 0.0], [1.0, 1.0]]
    assert batch.behaviour_logp.tolist() == [[-0.5, 0.0], [-0.25, -0.75]]


def test_token_logprobs_reads_each_token_from_the_logits_one_column_to_its_left():
    batch = collate(_result(), PAD)
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 16)
    got = token_logprobs(logits, batch, temperature=0.5)
    for row in range(2):
        for t in range(2):
            target = batch.input_ids[row, 2 + t]
            expected = torch.log_softmax(logits[row, 1 + t] / 0.5, -1)[target]
            assert got[row, t] == pytest.approx(float(expected), abs=1e-6)


def test_merging_engine_results_keeps_rows_in_engine_order():
    merged = merge_results([_result(), _result()])
    assert merged.response_ids == [[8], [9, 10], [8], [9, 10]] and len(merged) == 4


def test_shards_cover_every_row_once():
    slices = [shard(10, r, 3) for r in range(3)]
    assert [i for s in slices for i in range(s.start, s.stop)] == list(range(10))


def test_batch_arithmetic_that_cannot_work_is_rejected_naming_the_field():
    with pytest.raises(ValueError, match=r"spec\.actor\.replicas"):
        train_layout(32, TrainerSpec(replicas=3), "actor")
    with pytest.raises(ValueError, match=r"spec\.critic\.microBatchSize"):
        train_layout(32, TrainerSpec(micro_batch_size=5), "critic")
    layout = train_layout(32, TrainerSpec(replicas=2, micro_batch_size=4), "actor")
    assert (layout.micro, layout.accumulation, layout.global_batch) == (4, 4, 32)


def test_collate_masks_an_episodes_observation_tokens_out_of_the_response_but_attends_to_them() -> None:
    result = GenerationResult(
        ["p"], ["r"], [[5, 6]], [[7, 8, 9, 10]], [[-0.5, 0.0, 0.0, -0.25]], [True], loss_mask=[[1, 0, 0, 1]]
    )
    batch = collate(result, pad_id=0)
    assert batch.response_mask.tolist() == [[1.0, 0.0, 0.0, 1.0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1]]
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 10]]
