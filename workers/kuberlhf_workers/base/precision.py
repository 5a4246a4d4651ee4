"""spec.precision as a torch dtype on this node: where "auto" becomes bf16 or fp32.

Each worker resolves it on the hardware it runs on (a cluster may mix node types). "auto" is bf16
on a GPU with bf16 and fp32 on a CPU: a node alone does not know the model's size, and on CPU bf16
pays only for real models (bench/README.md, "bf16 on CPU"), so a run on CPUs only has already
turned auto into bf16 or fp32 for every worker before they start (kuberlhf.precision_choice). On a
CPU a bf16 trainer computes under autocast over its fp32 module and optimizer (training/rank.py;
DeepSpeed's own bf16 mode, the GPU path, is slower than fp32 on CPU); the engines hold bf16
weights. The trainers' master weights and optimizer state stay fp32 whatever this says; only the
compute dtype of forward and backward passes follows it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from kuberlhf import precision_choice
from kuberlhf.api import Precision, RLHFJobSpec

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


def compute_dtype(precision: Precision, device: torch.device) -> torch.dtype:
    """The dtype a model of the job computes in on `device`."""
    if precision == "fp32":
        return torch.float32
    if precision == "auto":
        on_bf16_gpu = device.type == "cuda" and bool(torch.cuda.is_bf16_supported())
        return torch.bfloat16 if on_bf16_gpu else torch.float32
    if device.type == "cpu" and not cpu_has_bf16():
        warnings.warn(
            "spec.precision: bf16 on a CPU without AVX-512 BF16, AMX or the Arm BF16 extension is "
            "emulated and slower than fp32; set precision: fp32 (or auto) here",
            stacklevel=2,
        )
    return torch.bfloat16


def resolve_cpu_run(spec: RLHFJobSpec) -> tuple[RLHFJobSpec, precision_choice.PrecisionChoice | None]:
    """`spec` with precision auto made concrete when every role runs on CPUs (the choice, to print),
    else `spec` as it is and None. The checkpoint fingerprint resolves the same way, so `auto` and
    what it becomes on this machine are one job."""
    if spec.precision != "auto" or precision_choice.uses_gpus(spec):
        return spec, None
    facts = precision_choice.PrecisionFacts(cpu_has_bf16(), precision_choice.actor_hidden(spec))
    choice = precision_choice.choose_precision(spec, facts)
    return spec.model_copy(update={"precision": choice.precision}), choice
