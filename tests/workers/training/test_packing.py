"""Packed SFT batches: fewer rows, the same loss as padded ones (no attention across sequences)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kuberlhf_workers.base.records import Sequence
from kuberlhf_workers.training.algorithms import sft_loss
from kuberlhf_workers.training.batch import token_logprobs
from kuberlhf_workers.training.forward import forward_logits
from kuberlhf_workers.training.offline import sequence_batch
from kuberlhf_workers.training.packing import bins, pack, packed_logprobs

pytestmark = pytest.mark.unit


def test_first_fit_decreasing_fills_rows_up_to_the_capacity_and_keeps_every_sequence() -> None:
    lengths = [5, 3, 8, 2, 2, 7, 1]
    rows = bins(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 3  # 28 tokens in rows of 10


def test_positions_restart_per_sequence_and_only_response_tokens_are_targets() -> None:
    packed = pack([Sequence([1, 2], [3]), Sequence([4], [5, 6])], capacity=8, pad_id=0)
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 5, 6]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1, 2]]
    # targets are input_ids[1:] = 2 3 4 5 6: responses 3, 5, 6 count; 4 (a prompt token) does not
    assert packed.target_mask.tolist() == [[0.0, 1.0, 0.0, 1.0, 1.0]]


def test_a_packed_micro_batch_has_the_loss_of_the_padded_one(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    seqs = [
        Sequence(
            torch.randint(3, 200, (int(p),), generator=g).tolist(),
            torch.randint(3, 200, (int(r),), generator=g).tolist(),
        )
        for p, r in [(5, 3), (2, 9), (7, 1), (3, 4), (1, 2)]
    ]
    padded = sequence_batch(seqs, pad_id=0)
    with torch.no_grad():
        logp = token_logprobs(forward_logits(model, padded), padded, 1.0)
        expected = sft_loss(logp, padded.response_mask)
        packed = pack(seqs, capacity=16, pad_id=0)
        out = model(
            input_ids=packed.input_ids, position_ids=packed.position_ids, attention_mask=None, use_cache=False
        )
        got = sft_loss(packed_logprobs(out.logits, packed), packed.target_mask)
    assert packed.input_ids.shape[0] < len(seqs)
    assert float(got) == pytest.approx(float(expected), rel=1e-5)
