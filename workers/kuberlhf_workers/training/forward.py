"""One forward pass of a (possibly DeepSpeed-wrapped) HF model over a rollout batch."""

from __future__ import annotations

import torch

from kuberlhf_workers.training.batch import Batch


def forward_logits(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Logits (or a value head's outputs) for every position of the batch, on the model's device."""
    device = next(iter(model.parameters())).device
    out = model(
        input_ids=batch.input_ids.to(device),
        attention_mask=batch.attention_mask.to(device),
        position_ids=batch.position_ids.to(device),
        use_cache=False,
    )
    logits: torch.Tensor = out.logits
    return logits
