"""One table from one or more results.json files written by bench/vs_trl.py.

    python bench/summary.py bench/out/*/results.json     (no arguments: the newest run)

Uses only the standard library, so any Python can print it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "out"
COLUMNS = (
    ("startup_s", "startup s", "{:.1f}"),
    ("steady_samples_per_s", "samples/s", "{:.1f}"),
    ("steady_step_s", "s/step", "{:.2f}"),
    ("peak_rss_mib", "peak RSS MiB", "{:.0f}"),
    ("wall_s", "wall s", "{:.1f}"),
    ("weights_relative_change", "weights moved", "{:.1e}"),
)


def _cell(value: Any, fmt: str) -> str:
    return fmt.format(value) if isinstance(value, int | float) else "-"


def _phases(system: dict[str, Any]) -> str:
    phases = system.get("steady_phases_s") or {}
    return " ".join(f"{name} {seconds:.2f}" for name, seconds in phases.items()) or "-"


def _reward(system: dict[str, Any]) -> str:
    first, last = system.get("reward_first"), system.get("reward_last")
    return f"{first:.3f} -> {last:.3f}" if first is not None and last is not None else "-"


def rows_for(results: dict[str, Any]) -> list[list[str]]:
    """One row per system, then the kuberlhf / TRL ratios, for one results file."""
    run = results.get("created", "?")
    steps = results.get("config", {}).get("steps", "?")
    rows = []
    for name, system in results["systems"].items():
        status = "ok" if system.get("exit_code") == 0 and system.get("steps_done") == steps else "FAILED"
        rows.append(
            [f"{run}", name, f"{system.get('steps_done', 0)}/{steps} {status}"]
            + [_cell(system.get(key), fmt) for key, _, fmt in COLUMNS]
            + [_reward(system), _phases(system)]
        )
    ratio = results.get("ratios_kuberlhf_over_trl", {})
    rows.append(
        [f"{run}", "kuberlhf/TRL", ""]
        + [_cell(ratio.get(key), "{:.2f}x") for key, _, _ in COLUMNS]
        + ["", ""]
    )
    return rows


def table(all_results: list[dict[str, Any]]) -> str:
    header = [
        "run",
        "system",
        "steps",
        *(title for _, title, _ in COLUMNS),
        "reward",
        "steady s/step by phase",
    ]
    body = [row for results in all_results for row in rows_for(results)]
    widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *body]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or sorted(OUT.glob("*/results.json"))[-1:]
    if not paths:
        print(
            f"no results: run bench/vs_trl.py first (it writes {OUT}/<timestamp>/results.json)",
            file=sys.stderr,
        )
        return 1
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        print(f"no such results file: {', '.join(missing)}", file=sys.stderr)
        return 1
    print(table([json.loads(p.read_text()) for p in paths]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
