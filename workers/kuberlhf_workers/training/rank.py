"""One rank of a DeepSpeed data-parallel world: joining it, checkpoints, and full weights out.

Whatever the objective, a trainer rank does the same things with its model: join the world with
the step deadline, gather ZeRO-3 shards when full tensors are needed (on every rank, or the next
gather hangs), save and load DeepSpeed state with the RNG, and stream full weights in buckets to
the weight-sync sender.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from kuberlhf.api import Precision, TrainerSpec
from kuberlhf_workers.base.precision import compute_dtype
from kuberlhf_workers.base.seeds import mix_seed
from kuberlhf_workers.base.transports import (
    NamedTensors,
    ParamMeta,
    WeightTransport,
    param_meta,
    plan_buckets,
)
from kuberlhf_workers.training.layout import Layout, deepspeed_config
from kuberlhf_workers.training.lora import OutWeight, Reader, base_model, export_weights, sync_weights
from kuberlhf_workers.training.master import master_weight

# Largest safetensors file an export writes, and so the most full weights it gathers at once.
EXPORT_SHARD_BYTES = 2 * 2**30
# Beside each rank's DeepSpeed state: how that state is laid out (StateFormat).
STATE_FORMAT_FILE = "state-format.json"
INIT_SEED = 104_723  # mixed into the spec's seed for fresh parameters: no other stream draws from it


class DeepSpeedRank:
    """Rank `rank` of a `layout.world`-rank world training `trainer`'s model (tag `tag` in checkpoints),
    computing in spec.precision's dtype on `device` (fp32 master weights either way)."""

    def __init__(
        self,
        tag: str,
        trainer: TrainerSpec,
        layout: Layout,
        rank: int,
        device: torch.device,
        precision: Precision = "auto",
    ):
        self.tag, self.trainer, self.layout, self.rank, self.device = tag, trainer, layout, rank, device
        self.dtype = compute_dtype(precision, device)
        self._model: Any = None  # the DeepSpeed-wrapped model once joined
        self.memory_mib: dict[str, float] = {}  # resident memory while joining (bench/zero_memory.py)
        self.sender: WeightTransport | None = None

    @property
    def autocast(self) -> bool:
        """bf16 compute on a CPU: an fp32 module and optimizer whose forward (and so backward) runs
        under bf16 autocast. DeepSpeed's own bf16 mode trains 2.6x slower than fp32 on CPU (its
        bf16 optimizer path), while autocast's bf16 matmuls are 1.9x faster than fp32 at 135M
        (bench/README.md, "bf16 on CPU"); on a GPU DeepSpeed's bf16 mode is the fast one."""
        return self.dtype == torch.bfloat16 and self.device.type == "cpu"

    @property
    def state_format(self) -> str:
        """How this rank's DeepSpeed checkpoint is laid out. DeepSpeed's bf16 mode (a GPU's) keeps
        bf16 weights and the fp32 masters in its optimizer's state; fp32 training and CPU autocast
        keep an fp32 module and a plain optimizer. Both runs say `precision: bf16`, so the job's
        fingerprint cannot tell a CPU checkpoint from a GPU one, and DeepSpeed cannot load either
        into the other."""
        return "deepspeed-bf16" if self.dtype == torch.bfloat16 and not self.autocast else "fp32-module"

    @property
    def model(self) -> Any:
        if self._model is None:
            raise RuntimeError(f"{self.tag} rank {self.rank} used before joining its DeepSpeed world")
        return self._model

    def join(self, master: tuple[str, int], build: Callable[[], torch.nn.Module], timeout_s: float,
             seed: int | None = None) -> None:
        """Join the data-parallel world, then build the model in it; all ranks call this concurrently.

        `seed` (the spec's) seeds the parameters the build creates afresh (a reward model's or
        critic's value head, LoRA adapters), the same on every rank, so one spec trains one model:
        unseeded, two runs of a pipeline's reward model differed from their first step.

        Under ZeRO-3 the model is built sharded: with an `HfDeepSpeedConfig` alive, from_pretrained
        creates every parameter inside `deepspeed.zero.Init` and loads the checkpoint into the shards,
        so no rank ever holds the whole model (72B in fp32 would be 288 GB per rank). The config is
        dropped once DeepSpeed owns the model, so later loads (a DPO reference) are plain again."""
        import deepspeed

        join_world(master, self.rank, self.layout.world, timeout_s)
        on_gpu = self.device.type == "cuda"
        bf16 = self.dtype == torch.bfloat16 and on_gpu  # DeepSpeed's bf16 mode; on CPU: autocast
        config = deepspeed_config(self.trainer, self.layout, on_gpu, bf16=bf16)
        sharded = None
        if self.trainer.zero_stage == 3:
            from transformers.integrations.deepspeed import HfDeepSpeedConfig

            sharded = HfDeepSpeedConfig(config)  # transformers keeps only a weak reference to it
        # VmRSS too: the process's own baseline (imports, gloo), which the host estimate adds.
        self.memory_mib = {"before_build": resident_mib(), "rss_before_build": resident_mib("VmRSS")}
        if seed is not None:
            torch.manual_seed(mix_seed(seed, INIT_SEED))
        model = build()
        if self.autocast:
            # Bound to this instance, so DeepSpeed's engine (which calls the module) and every
            # objective's forward run under it, and autograd replays the backward in the same dtypes.
            model.forward = torch.autocast("cpu", dtype=self.dtype)(model.forward)
        self.memory_mib["after_build"] = resident_mib()
        if self.trainer.gradient_checkpointing:
            model.gradient_checkpointing_enable()  # type: ignore[operator]
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        if isinstance(hidden, int):
            config = deepspeed_config(self.trainer, self.layout, on_gpu, hidden, bf16=bf16)
        self._model, *_ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config
        )
        del sharded
        if self.trainer.zero_stage == 0 and self.layout.world == 1:
            # Nothing to average over one rank, but DeepSpeed's stage-0 all-reduce would still copy
            # every gradient into flat buckets and back: 0.35 s of a 2.3 s train step at 135M.
            self._model.enable_backward_allreduce = False
        self.memory_mib["after_initialize"] = resident_mib()

    def gathered(self, params: list[torch.nn.Parameter]) -> Any:
        """Full tensors inside the block under ZeRO-3 (a no-op otherwise); collective."""
        import deepspeed

        return deepspeed.zero.GatheredParameters(
            params, modifier_rank=None, enabled=self.trainer.zero_stage == 3
        )

    # -- weights out ------------------------------------------------------------------------------

    def param_meta(self) -> list[ParamMeta]:
        """What a weight sync sends: every weight, or under LoRA only the merged adapted ones."""
        return self._sync_metas(sync_weights(self.model.module))

    def _full_buckets(
        self, plan: list[list[ParamMeta]], out: dict[str, OutWeight], master: bool = False
    ) -> Iterator[NamedTensors]:
        """Full tensors bucket by bucket, in the plan's dtypes, read from the module (what the
        rollout engines compute with) or with `master` from the optimizer's fp32 master weights
        (what an export keeps)."""
        read = self._reader(master)
        for bucket in plan:
            params = [p for m in bucket for p in out[m.name][0]]
            with self.gathered(params):
                yield [(m.name, _as_dtype(out[m.name][1](read), m.dtype)) for m in bucket]

    def _sync_metas(self, out: dict[str, OutWeight]) -> list[ParamMeta]:
        """What a sync sends: the weights as the engines compute with them. Under CPU autocast the
        module is fp32 but the engines run bf16, so the cast happens before the wire (half the bytes)."""
        metas = _metas(out)
        if not self.autocast:
            return metas
        low = str(self.dtype).removeprefix("torch.")
        return [replace(m, dtype=low) if m.dtype == "float32" else m for m in metas]

    def _reader(self, master: bool) -> Reader:
        if master:
            return lambda p: master_weight(self.model, p)
        return lambda p: p.data

    def send_weights(self, bucket_bytes: int) -> Any:
        """All ranks call this (ZeRO-3 gathers are collective); only rank 0 sends."""
        out = sync_weights(self.model.module)
        buckets = self._full_buckets(plan_buckets(self._sync_metas(out), bucket_bytes), out)
        if self.rank == 0:
            if self.sender is None:
                raise RuntimeError("send_weights before join_weight_sync: no weight-sync group yet")
            return self.sender.send(buckets)
        for _ in buckets:
            pass
        return None

    def parameters(self, master: bool = False) -> dict[str, torch.Tensor]:
        """Full parameters as float32 in the base model's names, adapted ones merged under LoRA
        (gathered under ZeRO, so every rank must call it): the ones the module computes with (what
        a sync gives the engines), or with `master` the optimizer's fp32 master weights (the same
        in fp32 training)."""
        out = {}
        read = self._reader(master)
        # Under CPU autocast the module computes with its fp32 weights rounded to bf16.
        computes_in = self.dtype if self.autocast and not master else torch.float32
        for name, (params, tensor) in export_weights(self.model.module).items():
            with self.gathered(params):
                out[name] = tensor(read).detach().to(computes_in).float().cpu().clone()
        return out

    # -- checkpoints ------------------------------------------------------------------------------

    def save(self, directory: str, hf_dir: str | None, tokenizer_path: str) -> None:
        """DeepSpeed state (model, optimizer, scheduler) and RNG state on every rank; HF weights from
        rank 0 (the folder a user loads with from_pretrained)."""
        self.model.save_checkpoint(directory, tag=self.tag)
        if self.rank == 0:
            marker = Path(directory) / self.tag / STATE_FORMAT_FILE
            marker.write_text(json.dumps({"format": self.state_format}))
        rng = Path(self._rng_file(directory))
        rng.parent.mkdir(parents=True, exist_ok=True)
        torch.save(_rng_state(), rng)
        if hf_dir is not None:
            self.export(hf_dir, tokenizer_path)

    def export(self, hf_dir: str, tokenizer_path: str, shard_bytes: int = EXPORT_SHARD_BYTES) -> None:
        """HF weights (safetensors shards and their index, as save_pretrained writes them), config and
        tokenizer from rank 0: the folder a user loads with from_pretrained. Every rank calls it
        (ZeRO-3 gathers are collective); parameters are gathered one shard file at a time, so rank 0
        never holds more than `shard_bytes` of full weights, whatever the model's size. The weights
        are the fp32 master weights, also after bf16 training (training.master)."""
        from safetensors.torch import save_file

        module = base_model(self.model.module)
        weights = export_weights(self.model.module)  # under LoRA: merged, in the base model's names
        out = Path(hf_dir)
        if self.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            for stale in [*out.glob("model*.safetensors"), *out.glob("model.safetensors.index.json")]:
                stale.unlink()
        fp32 = [ParamMeta(m.name, m.shape, "float32") for m in _metas(weights)]
        buckets = self._full_buckets(plan_buckets(fp32, shard_bytes), weights, master=True)
        files: list[list[str]] = []
        total = 0
        for i, bucket in enumerate(buckets):
            names = [name for name, _ in bucket]
            files.append(names)
            if self.rank == 0:
                tensors = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in bucket}
                total += sum(t.numel() * t.element_size() for t in tensors.values())
                save_file(tensors, str(out / f"part-{i:05d}.safetensors"), metadata={"format": "pt"})
        if self.rank != 0:
            return
        _name_shards(out, files, total)
        module.config.save_pretrained(hf_dir)
        if getattr(module, "generation_config", None) is not None and module.can_generate():
            module.generation_config.save_pretrained(hf_dir)
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(hf_dir)

    def load(self, directory: str) -> None:
        problem = state_format_problem(directory, self.tag, self.state_format)
        if problem is not None:
            raise ValueError(problem)
        path, _ = self.model.load_checkpoint(directory, tag=self.tag, load_optimizer_states=True)
        if path is None:
            raise FileNotFoundError(f"no {self.tag} DeepSpeed checkpoint in {directory}")
        rng = Path(self._rng_file(directory))
        if rng.is_file():
            _set_rng_state(torch.load(rng, weights_only=False))

    def _rng_file(self, directory: str) -> str:
        return str(Path(directory) / self.tag / f"rng-rank{self.rank}.pt")


def state_format_problem(directory: str, tag: str, mine: str) -> str | None:
    """Why this rank must not load the `tag` state in `directory` (laid out for another kind of
    run), naming both and the ways out; None when it may (or the checkpoint predates the marker)."""
    marker = Path(directory) / tag / STATE_FORMAT_FILE
    if not marker.is_file():
        return None
    saved = json.loads(marker.read_text()).get("format")
    if saved == mine:
        return None
    kinds = {"deepspeed-bf16": "DeepSpeed's bf16 mode (bf16 on GPUs)",
             "fp32-module": "an fp32 module (fp32, or bf16 autocast on CPUs)"}
    return (f"checkpoint {directory}: its {tag} state was written by {kinds.get(saved, repr(saved))}, and "
            f"this run trains with {kinds[mine]}; DeepSpeed cannot load one into the other. Resume it "
            f"on the kind of machine that wrote it, or start a new run from the weights it exported "
            f"({Path(directory).parent / 'model'}, as spec.model.actor) with --no-resume")


def join_world(master: tuple[str, int], rank: int, world: int, timeout_s: float) -> None:
    """Join a DeepSpeed world (this process's default group) as `rank` of `world`."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    os.environ.update(
        MASTER_ADDR=master[0],
        MASTER_PORT=str(master[1]),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK="0",  # Ray gives each rank its own device
    )
    _skip_shm_allreduce_build()
    # As deepspeed.initialize would, but with the step deadline instead of torch's 30 minutes:
    # a rank stuck in a collective fails with the others instead of holding the job.
    deepspeed.init_distributed(
        get_accelerator().communication_backend_name(),
        verbose=False,
        timeout=timedelta(seconds=timeout_s),
    )


def _skip_shm_allreduce_build() -> None:
    """On CPU, DeepSpeed's communication backend JIT-loads a shared-memory all-reduce op, and every
    process that loads it holds a file lock in the torch extensions folder while ninja checks the
    build. A rank killed in that window (a dead engine's replacement, preemption, the OOM killer)
    leaves the lock behind, and every later DeepSpeed start on that host waits on it forever. The op
    only serves DeepSpeed-Inference's tensor-parallel all-reduce, which no world here calls."""
    # Not `import deepspeed.comm.torch as ...`: that resolves to the `torch` package that
    # deepspeed.comm re-exports.
    ds_torch: Any = importlib.import_module("deepspeed.comm.torch")
    if hasattr(ds_torch, "build_shm_op"):
        ds_torch.build_shm_op = lambda: None


def _as_dtype(tensor: torch.Tensor, dtype: str) -> torch.Tensor:
    return tensor if str(tensor.dtype) == f"torch.{dtype}" else tensor.to(getattr(torch, dtype))


def _metas(out: dict[str, OutWeight]) -> list[ParamMeta]:
    """Shapes and dtypes of the weights out: each has its first parameter's (a merged weight is
    the base weight's shape)."""
    return [param_meta(name, params[0]) for name, (params, _) in out.items()]


def resident_mib(field: str = "RssAnon") -> float:
    """This process's resident memory now, in MiB (by default anonymous pages only: a memory-mapped
    checkpoint being read is page cache, not memory the rank holds)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _name_shards(out: Path, files: list[list[str]], total_bytes: int) -> None:
    """Rename the written parts as save_pretrained names them: model.safetensors when one file
    holds everything, else model-0000i-of-0000n.safetensors plus model.safetensors.index.json."""
    parts = sorted(out.glob("part-*.safetensors"))
    if len(parts) == 1:
        parts[0].rename(out / "model.safetensors")
        return
    weight_map = {}
    for i, (part, names) in enumerate(zip(parts, files, strict=True), start=1):
        final = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
        part.rename(out / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
