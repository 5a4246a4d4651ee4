"""The fp32 master weights behind a bf16 DeepSpeed module.

In DeepSpeed's bf16 mode the module's parameters are bf16 copies; the weights the optimizer
updates live in fp32 inside it (ZeRO's partitions, or at stage 0 its unfused wrapper's copies).
The exported model is written from these, so a bf16 run loses no precision in its output and the
next stage (a job: reference, a resume as fp32) starts from the weights that were trained.
"""

from __future__ import annotations

from typing import Any

import torch


def master_weight(engine: Any, param: torch.nn.Parameter) -> torch.Tensor:
    """The full fp32 master copy of `param`. Collective under ZeRO 1-3 (all-reduced from the
    ranks' partitions), so every rank calls it for the same parameters in the same order. An fp32
    module is its own master: its (gathered) data is returned; a frozen bf16 parameter has only its
    bf16 copy."""
    if param.dtype == torch.float32:
        return param.data
    if not param.requires_grad:  # frozen (never updated): the optimizer holds no copy of it
        return param.data.float()
    from deepspeed.utils import safe_get_full_fp32_param

    full = safe_get_full_fp32_param(param)
    if full is not None:
        return full
    # Stage 0 in bf16 (DeepSpeed's unfused optimizer): fp32 copies kept beside the module's groups.
    optimizer = getattr(engine, "optimizer", None)
    groups = zip(getattr(optimizer, "fp16_groups", []), getattr(optimizer, "fp32_groups", []), strict=True)
    for low, high in groups:
        for low_param, high_param in zip(low, high, strict=True):
            if low_param is param:
                return high_param.data
    raise RuntimeError(f"no fp32 master copy of a {param.dtype} parameter in {type(optimizer).__name__}")
