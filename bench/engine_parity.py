"""Do the hf and vllm rollout engines learn alike? The same spec, both engines, several seeds.

    .venv/bin/python bench/engine_parity.py [--seeds 5] [--steps 20] [--out bench/out/engine-parity-<UTC>/]

Each run is `kuberlhf run` of examples/tiny-grpo.yaml (builtin:tiny, the share-of-digits reward,
lr 1e-2, 8 prompts x 4 samples) with `rollout.engine` set to hf or vllm and `seed` set, one run
at a time, the engines alternating per seed so a machine's drift shifts both alike. The outcome
per run is the mean reward over its last 3 steps; per engine the mean and the sample standard
deviation over seeds, and the gap between the engines in units of its standard error. Writes
results.json ("benchmark": "engine-parity").
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "tiny-grpo.yaml"
ENGINES = ("hf", "vllm")
TAIL = 3


def run_one(engine: str, seed: int, steps: int, out: Path) -> list[float]:
    """One run's per-step mean rewards."""
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["rollout"]["engine"] = engine
    doc["spec"]["seed"] = seed
    doc["spec"]["schedule"]["steps"] = steps
    doc["spec"]["checkpoint"]["everySteps"] = steps
    doc["spec"]["reward"]["function"] = str(ROOT / "examples" / "rewards" / "digits.py") + ":reward"
    folder = out / f"{engine}-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spec.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    command = [str(ROOT / ".venv" / "bin" / "kuberlhf"), "run", str(folder / "spec.yaml"),
               "--output", str(folder / "run"), "--quiet", "--no-resume"]
    with (folder / "log.txt").open("w") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True, cwd=ROOT)
    lines = (folder / "run" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["reward_mean"] for line in lines if line.strip()]


def summarise(outcomes: dict[str, list[float]]) -> dict[str, Any]:
    """Mean and spread per engine, and the gap in standard errors (|z| < 2: no clear difference)."""
    out: dict[str, Any] = {
        engine: {"mean": statistics.fmean(v), "stdev": statistics.stdev(v) if len(v) > 1 else 0.0, "runs": v}
        for engine, v in outcomes.items()
    }
    hf, vllm = outcomes["hf"], outcomes["vllm"]
    paired = min(len(hf), len(vllm)) > 1
    error = (math.sqrt(statistics.variance(hf) / len(hf) + statistics.variance(vllm) / len(vllm))
             if paired else 0.0)
    out["gap_vllm_minus_hf"] = out["vllm"]["mean"] - out["hf"]["mean"]
    out["gap_in_standard_errors"] = out["gap_vllm_minus_hf"] / error if error else None
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = (args.out or ROOT / "bench" / "out" / f"engine-parity-{stamp}").resolve()
    curves: dict[str, dict[int, list[float]]] = {e: {} for e in ENGINES}
    for seed in range(1, args.seeds + 1):
        for engine in ENGINES if seed % 2 else ENGINES[::-1]:
            curves[engine][seed] = run_one(engine, seed, args.steps, out)
            tail = statistics.fmean(curves[engine][seed][-TAIL:])
            print(f"seed {seed} {engine}: reward over the last {TAIL} steps {tail:.3f}", flush=True)
    outcomes = {e: [statistics.fmean(c[-TAIL:]) for c in curves[e].values()] for e in ENGINES}
    result = {"benchmark": "engine-parity", "created": stamp, "steps": args.steps, "seeds": args.seeds,
              "summary": summarise(outcomes), "curves": curves}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    s = result["summary"]
    for engine in ENGINES:
        print(f"{engine}: {s[engine]['mean']:.3f} +- {s[engine]['stdev']:.3f} over {args.seeds} seeds")
    z = s["gap_in_standard_errors"]
    print(f"vllm - hf: {s['gap_vllm_minus_hf']:+.3f} ({'-' if z is None else f'{z:+.2f}'} standard errors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
