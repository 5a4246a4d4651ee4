"""Host memory per trainer rank by ZeRO stage: does a ZeRO-3 rank ever hold the whole model?

    .venv/bin/python bench/zero_memory.py [--layers 20 --hidden 1024] [--stages 2,3] [--out DIR]

Builds a Llama of 100M+ parameters locally (random weights, the builtin:tiny tokenizer; 8 layers
of hidden 1024 are 104M), then for each ZeRO stage starts two real trainer ranks of the offline
program (SFT, DeepSpeed on gloo, one local Ray, records cut to data.maxLength 128) and reads each
rank's peak resident memory (VmHWM from /proc) three times: after the actor started (imports
only), after the model was built and handed to DeepSpeed, and after two optimizer steps; during
the steps a sampler in each rank keeps the peak of forward, backward and step apart. It sets
`kuberlhf.memory.host_trainer_estimate` for the same spec and model against the peak. Then it
exports the trained model and checks that the export loads and equals what the ranks hold.
Numbers in MiB and as multiples of the model's fp32 size; they depend on the machine, so this is
a benchmark, not a test. Peak host memory is about 2 x 3.3 GiB at 104M with ZeRO-3, 2 x 4.7 GiB
at 155M, plus the driver's 1-2 GiB: run one at a time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MAX_LENGTH = 128  # data.maxLength of the runs: tokens per record, so per micro-batch


def build_model(dest: Path, layers: int, hidden: int) -> int:
    """A randomly initialised Llama saved with the builtin:tiny tokenizer; returns its parameter count."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from kuberlhf_workers.base.builtin import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("builtin:tiny"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return sum(p.numel() for p in model.parameters())


def peak_mib(handle: Any) -> float:
    """VmHWM of the actor's process (the most it has ever been resident), in MiB."""
    import ray

    def read(_: Any) -> float:
        return _status_mib("VmHWM")

    return float(ray.get(handle.actor.__ray_call__.remote(read)))


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def watch_phases(worker: Any) -> None:
    """Runs inside a trainer actor: labels the DeepSpeed engine's forward, backward and step and
    samples resident memory every 2 ms, keeping each phase's peak, so the estimate's parts can be
    told apart (weights and states persist; gathered weights, gradients and the optimizer's
    temporaries come and go by phase)."""
    import threading

    engine = worker.rank.model
    state: dict[str, Any] = {"phase": "before training", "peaks": {}}

    def sample() -> None:
        while True:
            rss, phase = _status_mib("VmRSS"), state["phase"]
            state["peaks"][phase] = max(rss, state["peaks"].get(phase, 0.0))
            time.sleep(0.002)

    def labelled(name: str, call: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            state["phase"] = name
            try:
                return call(*args, **kwargs)
            finally:
                state["phase"] = f"after {name}"

        return run

    for name in ("forward", "backward", "step"):
        setattr(engine, name, labelled(name, getattr(engine, name)))
    threading.Thread(target=sample, daemon=True).start()
    worker.phase_watch = state


def _rank0_parameters(worker: Any) -> Any:
    """Every rank gathers (a collective), only rank 0's copy comes back: two would double the
    driver's memory for nothing."""
    held = worker.rank.parameters()
    return held if worker.rank.rank == 0 else None


def run_stage(zero: int, model_dir: Path, work: Path) -> dict[str, Any]:
    import ray
    import torch

    from kuberlhf.api import parse_job
    from kuberlhf.seats import seats_for
    from kuberlhf_workers.control.groups import start_group
    from kuberlhf_workers.control.handles import OfflineTrainerHandle
    from kuberlhf_workers.control.offline import OfflineDriver
    from kuberlhf_workers.training.offline import OfflineTrainerWorker

    data = work / "train.jsonl"
    # Records longer than data.maxLength, cut to it: every micro-batch is as long as the estimate assumes.
    counting = " ".join(str(n) for n in range(200))
    data.write_text(
        "".join(json.dumps({"prompt": f"Count {i}:", "response": counting}) + "\n" for i in range(8))
    )
    job = parse_job(
        {
            "apiVersion": "kuberlhf.io/v1alpha1",
            "kind": "RLHFJob",
            "metadata": {"name": f"zero{zero}"},
            "spec": {
                "algorithm": "sft",
                "model": {"actor": str(model_dir)},
                "data": {"train": str(data), "maxLength": MAX_LENGTH},
                "actor": {"replicas": 2, "zeroStage": zero, "microBatchSize": 1, "globalBatchSize": 4},
                "schedule": {"steps": 2},
            },
        }
    )
    from kuberlhf.memory import host_trainer_estimate
    from kuberlhf.modelsize import model_shape

    estimate = host_trainer_estimate(job.spec, job.spec.actor, model_shape(str(model_dir)))
    driver = OfflineDriver(job, work, work / f"zero{zero}")
    driver.load_data()
    spec, plan = job.spec, driver.placements.plan
    seats = seats_for(plan, spec, "actor")
    actor = driver._actor_ref()
    trainers = start_group(
        OfflineTrainerWorker,
        seats,
        driver.placements,
        lambda i: (spec, actor, actor, None, i, 0.0, 1, driver.pad_id),
        lambda handle, i: OfflineTrainerHandle(handle, f"rank {i}"),
    ).actors
    driver.trainers = trainers
    try:
        ray.get([t.ready() for t in trainers])
        started = [peak_mib(t) for t in trainers]
        master = ray.get(trainers[0].master_address())
        began = time.perf_counter()
        ray.get([t.init_world(master) for t in trainers])
        load_s = time.perf_counter() - began
        loaded = [peak_mib(t) for t in trainers]
        joining = ray.get([t.actor.__ray_call__.remote(lambda self: self.rank.memory_mib) for t in trainers])
        ray.get([t.actor.__ray_call__.remote(watch_phases) for t in trainers])
        for step in range(2):
            driver.train_step(step)
        trained = [peak_mib(t) for t in trainers]
        phases = ray.get(
            [t.actor.__ray_call__.remote(lambda self: dict(self.phase_watch["peaks"])) for t in trainers]
        )
        exported = driver.export()
        from safetensors.torch import load_file

        files = sorted(exported.glob("*.safetensors"))
        weights = {k: v for f in files for k, v in load_file(str(f)).items()}
        # What the ranks hold (gathered: every rank is called), against what was written.
        held = ray.get([t.actor.__ray_call__.remote(_rank0_parameters) for t in trainers])[0]
        equal = set(held) == set(weights) and all(torch.equal(held[k], weights[k]) for k in held)
    finally:
        for t in trainers:
            t.kill()
        driver.placements.remove()
    return {
        "zero_stage": zero,
        "estimate_mib": round(estimate.total / 2**20),
        "estimate_parts_mib": {k: round(v / 2**20) for k, v in estimate.parts.items()},
        "peak_mib_started": started,
        "peak_mib_loaded": loaded,
        "peak_mib_trained": trained,
        "anon_mib_while_joining": joining,
        "peak_mib_by_phase": phases,
        "load_s": round(load_s, 1),
        "exported_files": len(files),
        "exported_tensors": len(weights),
        "export_equals_ranks": equal,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--stages", default="2,3", help="ZeRO stages to run, one after the other")
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench" / "out" / time.strftime("zero-memory-%Y%m%d-%H%M%S")
    )
    args = parser.parse_args()
    import ray

    from kuberlhf_workers.control.driver import start_ray

    with tempfile.TemporaryDirectory(prefix="zero-memory-") as tmp:
        work = Path(tmp)
        params = build_model(work / "model", args.layers, args.hidden)
        fp32_mib = params * 4 / 2**20
        from kuberlhf.api import parse_job

        probe = parse_job(
            {
                "apiVersion": "kuberlhf.io/v1alpha1",
                "kind": "RLHFJob",
                "metadata": {"name": "p"},
                "spec": {
                    "algorithm": "sft",
                    "model": {"actor": "m"},
                    "data": {"train": "t.jsonl"},
                    "actor": {"replicas": 2},
                },
            }
        )
        start_ray(probe.spec, "local")
        try:
            rows = [run_stage(int(zero), work / "model", work) for zero in args.stages.split(",")]
        finally:
            ray.shutdown()
    result = {"parameters": params, "fp32_mib": round(fp32_mib, 1), "stages": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"model: {params / 1e6:.0f}M parameters, {fp32_mib:.0f} MiB in fp32")
    print("anonymous resident memory held by the model itself (after build - before build), per rank:")
    for row in rows:
        held = [m["after_build"] - m["before_build"] for m in row["anon_mib_while_joining"]]
        print(f"  ZeRO-{row['zero_stage']}: " + ", ".join(f"{h:.0f} MiB ({h / fp32_mib:.2f}x)" for h in held))
    header = ("ZeRO", "rank", "after start", "after load", "load - start", "after 2 steps")
    print("  ".join(f"{h:>{max(4, len(h))}}" for h in header))
    for row in rows:
        for rank in range(2):
            started, loaded, trained = (
                row[k][rank] for k in ("peak_mib_started", "peak_mib_loaded", "peak_mib_trained")
            )
            print(
                f"{row['zero_stage']:>4}  {rank:>4}  {started:>11.0f}  {loaded:>10.0f}  "
                f"{(loaded - started) / fp32_mib:>11.2f}x  {trained:>13.0f}"
            )
    print("peak resident memory by phase of the two steps (VmRSS every 2 ms), MiB:")
    for row in rows:
        for rank in range(2):
            print(f"  ZeRO-{row['zero_stage']} rank {rank}: "
                  + ", ".join(f"{k} {v:.0f}" for k, v in row["peak_mib_by_phase"][rank].items()))
    print(f"results in {args.out / 'results.json'}")
    print("host_trainer_estimate against the peak (VmHWM after 2 steps), MiB:")
    for row in rows:
        for rank, peak in enumerate(row["peak_mib_trained"]):
            est = row["estimate_mib"]
            print(f"  ZeRO-{row['zero_stage']} rank {rank}: estimate {est}, measured {peak:.0f}, "
                  f"estimate / measured {est / peak:.2f}")
    print(
        "export equals the trained weights: "
        + ", ".join(f"ZeRO-{r['zero_stage']} {'yes' if r['export_equals_ranks'] else 'NO'}" for r in rows)
    )
    return 0 if all(r["export_equals_ranks"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
