"""Which attention kernel a transformers model loads on a CPU, trained or generating.

On a CPU transformers' eager attention beats SDPA's CPU kernel at the short lengths RL runs use:
- training: SDPA's backward is the slow part (bench/cpu_attention.py, 2026-12-06: a bf16 train step
  1.36x / 1.10x faster at 11M with 34 / 130-token sequences, 1.04x / 1.06x at 135M);
- generating: decode attends one query to a short KV cache, where SDPA's per-call overhead
  dominates (2026-12-06, quiet machine, bf16, 8 prompts x 4 samples x 32 tokens: a batch 0.25 s
  against 0.29 at 11M, 3.5 against 4.0 s at 135M; 650-token sequences at 11M 7.5 against 9.5 s).
Eager keeps every head's [L, L] probabilities for the backward (bf16 at 135M, 16 rows of 512
tokens: ~2.3 GB over its 30 layers, growing with L squared), so specs allowing longer sequences
keep SDPA, which holds O(L). The default spec (256 prompt + 256 new tokens) is just inside.
"""

from __future__ import annotations

import torch

CPU_EAGER_MAX_TOKENS = 512


def cpu_attention(device: torch.device, longest: int) -> str | None:
    """Eager on a CPU when no sequence is longer than `CPU_EAGER_MAX_TOKENS` (`longest`: the spec's
    `sequence_tokens`), else None: transformers' default, SDPA."""
    return "eager" if device.type == "cpu" and longest <= CPU_EAGER_MAX_TOKENS else None
