"""This machine's matmul peak in fp32 and bf16, on the cores and threads the benchmark uses.

    python bench/peak.py --threads 2          # prints {"fp32": GFLOP/s, "bf16": GFLOP/s, ...}

MFU in bench/vs_trl.py divides a system's model FLOPs per second by these, measured in the same
run on the same pinned cores (the parent starts this under the same taskset), so a busy or
throttled machine lowers the peak and the achieved rate alike. The peak is the best of a few
square sizes, each the median of repeated products: what torch's CPU kernels reach on a large,
well-shaped matmul, not a datasheet number.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

SIZES = (1024, 2048)
REPEATS = 5


def gflops(dtype_name: str, n: int, repeats: int = REPEATS) -> float:
    """The median GFLOP/s of `repeats` n×n by n×n products in one dtype, after a warm-up."""
    import torch

    dtype = getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[dtype_name])
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        rates.append(2 * n**3 / (time.perf_counter() - started) / 1e9)
    return statistics.median(rates)


def measure(threads: int) -> dict[str, float | int]:
    import torch

    torch.set_num_threads(threads)
    out: dict[str, float | int] = {"threads": threads}
    for name in ("fp32", "bf16"):
        out[name] = max(gflops(name, n) for n in SIZES)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
