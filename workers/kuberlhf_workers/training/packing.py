"""Padding-free SFT batches: short sequences packed into shared rows (pure).

A micro-batch of short records padded to its longest one spends most of its compute on pads.
Packed, each row holds several sequences back to back; position ids restart at 0 for each, and
with no attention mask transformers builds a block-diagonal causal mask from them, so no token
attends across a sequence boundary. The loss counts only response tokens, so the boundary token
(the next sequence's first, a prompt token) is never a target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kuberlhf_workers.base.records import Sequence


@dataclass(frozen=True)
class Packed:
    input_ids: torch.Tensor  # [R, L]
    position_ids: torch.Tensor  # [R, L], restarting at every sequence (and at the padding)
    target_mask: torch.Tensor  # [R, L-1] float: 1 where input_ids[:, t + 1] is a response token


def bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices grouped so each group's lengths sum to at most `capacity`
    (a longer sequence gets a row of its own)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        slot = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
        if slot is None:
            rows.append([i])
            room.append(capacity - lengths[i])
        else:
            rows[slot].append(i)
            room[slot] -= lengths[i]
    return rows


def pack(seqs: list[Sequence], capacity: int, pad_id: int) -> Packed:
    groups = bins([len(s.ids) for s in seqs], capacity)
    width = max(sum(len(seqs[i].ids) for i in group) for group in groups)
    ids = torch.full((len(groups), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(groups), width), dtype=torch.long)
    response = torch.zeros((len(groups), width), dtype=torch.float32)
    for row, group in enumerate(groups):
        at = 0
        for i in group:
            seq = seqs[i]
            n = len(seq.ids)
            ids[row, at : at + n] = torch.tensor(seq.ids, dtype=torch.long)
            positions[row, at : at + n] = torch.arange(n)
            response[row, at + len(seq.prompt) : at + n] = 1.0
            at += n
        positions[row, at:] = torch.arange(width - at)  # the padding is a sequence of its own
    return Packed(ids, positions, response[:, 1:])


def packed_logprobs(logits: torch.Tensor, packed: Packed) -> torch.Tensor:
    """Log-prob of each next token ([R, L-1]) under `logits` ([R, L, V])."""
    scores = logits[:, :-1].float()
    targets = packed.input_ids[:, 1:].to(scores.device)
    return scores.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(scores, dim=-1)
