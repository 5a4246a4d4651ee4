"""Rollouts as training tensors: the pure glue between generation and the losses.

Prompts are left-padded and responses right-padded, so every response starts at the same
column `prompt_len`: the log-prob of response token t comes from the logits at column
`prompt_len + t - 1`, for every row, with one slice and no per-row indexing. A multi-turn
episode's response is one contiguous stretch too; the response mask (its loss mask) is what
leaves its observation tokens out of every loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kuberlhf_workers.base.samples import GenerationResult


@dataclass
class Batch:
    """A rollout batch ready for a forward pass (rows grouped by prompt, as generated)."""

    input_ids: torch.Tensor  # [B, P+T]
    attention_mask: torch.Tensor  # [B, P+T]
    position_ids: torch.Tensor  # [B, P+T]
    response_mask: torch.Tensor  # [B, T] float, 1 on the model's response tokens (0: padding, observations)
    behaviour_logp: torch.Tensor  # [B, T] log-probs under the rollout weights at sampling time
    prompt_len: int

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def rows(self, index: slice) -> Batch:
        return Batch(
            self.input_ids[index],
            self.attention_mask[index],
            self.position_ids[index],
            self.response_mask[index],
            self.behaviour_logp[index],
            self.prompt_len,
        )


def collate(result: GenerationResult, pad_id: int) -> Batch:
    """Pad a rollout into one rectangular batch (left-padded prompts, right-padded responses)."""
    rows = len(result)
    prompt_len = max(len(p) for p in result.prompt_ids)
    response_len = max(1, max(len(r) for r in result.response_ids))
    input_ids = torch.full((rows, prompt_len + response_len), pad_id, dtype=torch.long)
    attention = torch.zeros((rows, prompt_len + response_len), dtype=torch.long)
    response_mask = torch.zeros((rows, response_len), dtype=torch.float32)
    behaviour = torch.zeros((rows, response_len), dtype=torch.float32)
    columns = (result.prompt_ids, result.response_ids, result.response_logprobs, result.loss_masks())
    for i, (prompt, response, logp, loss_mask) in enumerate(zip(*columns, strict=True)):
        start = prompt_len - len(prompt)
        input_ids[i, start:prompt_len] = torch.tensor(prompt, dtype=torch.long)
        attention[i, start:prompt_len] = 1
        if response:
            input_ids[i, prompt_len : prompt_len + len(response)] = torch.tensor(response, dtype=torch.long)
            attention[i, prompt_len : prompt_len + len(response)] = 1
            # 0 on an episode's observations: they are attended to but never trained on.
            response_mask[i, : len(response)] = torch.tensor(loss_mask, dtype=torch.float32)
            behaviour[i, : len(logp)] = torch.tensor(logp, dtype=torch.float32)
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    return Batch(input_ids, attention, position_ids, response_mask, behaviour, prompt_len)


def response_logits(logits: torch.Tensor, prompt_len: int, response_len: int) -> torch.Tensor:
    """The logits that predicted each response token (one column to the left of the token)."""
    return logits[:, prompt_len - 1 : prompt_len - 1 + response_len]


def token_logprobs(logits: torch.Tensor, batch: Batch, temperature: float) -> torch.Tensor:
    """Log-probs of the response tokens under `logits` ([B, P+T, V]), temperature-scaled as sampled."""
    scores = response_logits(logits, batch.prompt_len, batch.response_mask.shape[1])
    return response_logprobs(scores, batch, temperature)


def response_logprobs(scores: torch.Tensor, batch: Batch, temperature: float) -> torch.Tensor:
    """Log-probs of the response tokens under the logits that predicted them ([B, T, V])."""
    scores = scores.float()
    if temperature > 0 and temperature != 1.0:
        scores = scores / temperature
    targets = batch.input_ids[:, batch.prompt_len : batch.prompt_len + scores.shape[1]].to(scores.device)
    picked = scores.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(scores, dim=-1)


def response_values(values: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Critic values ([B, P+T]) of the states in which each response token was chosen."""
    return response_logits(values, batch.prompt_len, batch.response_mask.shape[1]).float()
