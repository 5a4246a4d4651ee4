"""spec.precision: which dtype "auto" picks, which CPUs multiply bf16 natively, and that the real
models compute in it (a one-rank DeepSpeed world on gloo, the hf rollout backend, the reference and
the reward model) while the trainer's master weights, and so the export, stay fp32."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from kuberlhf.api import Precision, RLHFJobSpec, TrainerSpec
from kuberlhf_workers.base.models import ModelRef
from kuberlhf_workers.base.precision import compute_dtype, cpu_has_bf16, cpuinfo_flags

CPU = torch.device("cpu")
X86_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
X86_AMX = "flags\t\t: fpu avx512f amx_tile amx_bf16 amx_int8\n"
X86_PLAIN = "flags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


def test_cpuinfo_flags_reads_x86_flags_and_arm_features():
    assert {"avx512_bf16", "avx2"} <= cpuinfo_flags(X86_BF16)
    assert "bf16" in cpuinfo_flags(ARM_BF16)
    assert "processor" not in cpuinfo_flags(X86_BF16) and "0" not in cpuinfo_flags(X86_BF16)


@pytest.mark.parametrize(
    ("cpuinfo", "native"),
    [(X86_BF16, True), (X86_AMX, True), (ARM_BF16, True), (X86_PLAIN, False), ("", False)],
)
def test_a_cpu_has_bf16_only_with_avx512_bf16_amx_or_the_arm_extension(cpuinfo: str, native: bool):
    assert cpu_has_bf16(cpuinfo) is native


def test_fp32_and_bf16_are_honoured_and_auto_is_fp32_on_a_cpu():
    assert compute_dtype("fp32", CPU) == torch.float32
    assert compute_dtype("bf16", CPU) == torch.bfloat16
    assert compute_dtype("auto", CPU) == torch.float32


def test_precision_is_a_top_level_field_defaulting_to_auto_and_refusing_others():
    spec = {"model": {"actor": "builtin:tiny"}, "reward": {"function": "r.py:f"}}
    assert RLHFJobSpec.model_validate(spec).precision == "auto"
    with pytest.raises(ValueError, match="precision"):
        RLHFJobSpec.model_validate(spec | {"precision": "fp16"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_trainer_computes_in_its_precision_keeps_fp32_masters_and_exports_them(
    tiny_model_dir: Path, tmp_path: Path, precision: Precision
):
    import deepspeed.comm
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from kuberlhf_workers.training.layout import Layout
    from kuberlhf_workers.training.rank import DeepSpeedRank

    dtype = compute_dtype(precision, CPU)
    trainer = TrainerSpec(zero_stage=2, learning_rate=1e-2, micro_batch_size=4)
    rank = DeepSpeedRank("actor", trainer, Layout(4, 1, 4, 1), 0, CPU, precision)
    build = lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)  # noqa: E731
    rank.join(("127.0.0.1", _free_port()), build, 120)
    try:
        model = rank.model
        # bf16 on a CPU is an fp32 module under bf16 autocast; elsewhere the module holds the dtype.
        assert rank.autocast == (dtype == torch.bfloat16)
        assert {p.dtype for p in model.module.parameters()} == {torch.float32 if rank.autocast else dtype}
        ids = torch.randint(0, 100, (4, 12), generator=torch.Generator().manual_seed(0))
        logits = model(input_ids=ids, use_cache=False).logits
        assert logits.dtype == dtype
        # A sync sends what the engines compute with: the compute dtype, cast before the wire.
        assert {m.dtype for m in rank.param_meta()} == {str(dtype).removeprefix("torch.")}
        model.backward(logits.float().logsumexp(-1).mean())
        model.step()
        masters = rank.parameters(master=True)
        module = rank.parameters()
        rank.export(str(tmp_path / "export"), str(tiny_model_dir))
    finally:
        deepspeed.comm.destroy_process_group()
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert {t.dtype for t in exported.values()} == {torch.float32}
    for name, tensor in module.items():
        assert torch.equal(exported[name], masters[name]), f"{name}: the export is not the fp32 master"
        # The module computes with its master rounded to the compute dtype, nothing else.
        assert torch.equal(masters[name].to(dtype).float(), tensor), name
    if precision == "bf16":  # the masters keep what bf16 cannot hold: the update's small steps
        assert any(not torch.equal(m, m.bfloat16().float()) for m in masters.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_rollout_reference_and_reward_models_load_in_the_jobs_precision(
    tiny_model_dir: Path, tmp_path: Path, precision: Precision
):
    from kuberlhf_workers.rewards.model import RewardModelScorer, train_tiny_reward_model
    from kuberlhf_workers.rollout.backend import make_backend
    from kuberlhf_workers.training.reference import ReferenceWorker

    dtype = compute_dtype(precision, CPU)
    spec = RLHFJobSpec.model_validate(
        {"model": {"actor": str(tiny_model_dir)}, "reward": {"function": "r.py:f"}, "precision": precision}
    )
    backend = make_backend(spec, tiny_model_dir, CPU)
    assert {p.dtype for _, p in backend.named_parameters()} == {dtype}
    ref = ModelRef(str(tiny_model_dir), "spec.model.reference")
    reference = ReferenceWorker(ref, 0, 0, 0, 1.0, 4, precision)
    assert {p.dtype for p in reference.model.parameters()} == {dtype}
    reward_dir = train_tiny_reward_model(tmp_path / "rm", tiny_model_dir)
    scorer = RewardModelScorer(reward_dir, precision=precision)
    assert {p.dtype for p in scorer.model.parameters()} == {dtype}
    exact = RewardModelScorer(reward_dir, precision="fp32")(["Q: "] * 2, ["1 2 3 4", "the cat"])
    assert scorer(["Q: "] * 2, ["1 2 3 4", "the cat"]) == pytest.approx(exact, abs=0.05)
