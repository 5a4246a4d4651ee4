"""spec.precision as a torch dtype on this node: where "auto" becomes bf16 or fp32.

Each worker resolves it on the hardware it runs on (a cluster may mix node types), so "auto" never
asks a CPU without bf16 instructions to emulate them: there bf16 matmuls are slower than fp32 ones.
The trainers' master weights and optimizer state stay fp32 whatever this says (DeepSpeed's bf16
mode); only the compute dtype of forward and backward passes follows it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kuberlhf.api import Precision

# /proc/cpuinfo flags of CPUs with native bf16 matrix instructions: x86 AVX-512 BF16 and AMX,
# aarch64's BF16 extension (listed as "bf16" in Features).
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpuinfo_flags(text: str) -> set[str]:
    """Every flag of the `flags` (x86) and `Features` (aarch64) lines of a /proc/cpuinfo text."""
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bf16 natively: torch's own CPU probe (cpuinfo, which also checks
    that the OS enabled AMX state), else the kernel's /proc/cpuinfo flags."""
    if cpuinfo is None:
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        if any(getattr(torch.cpu, name, lambda: False)() for name in probes):
            return True
        proc = Path("/proc/cpuinfo")
        cpuinfo = proc.read_text() if proc.is_file() else ""
    return bool(cpuinfo_flags(cpuinfo) & BF16_CPU_FLAGS)


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return device.type == "cpu" and cpu_has_bf16()


def compute_dtype(precision: Precision, device: torch.device) -> torch.dtype:
    """The dtype a model of the job computes in on `device`."""
    if precision == "fp32" or (precision == "auto" and not bf16_supported(device)):
        return torch.float32
    return torch.bfloat16
