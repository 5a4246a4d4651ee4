"""The memory estimates' structure: what shards with the world, what ZeRO-3 gathers, where offload
moves the optimizer, and the host-memory warning of `kuberlhf run`. The numbers behind the host
estimate are measured by bench/zero_memory.py (bench/README.md), not here."""

from __future__ import annotations

from typing import Any

import pytest

from kuberlhf import api, memory
from kuberlhf.modelsize import ModelShape

pytestmark = pytest.mark.unit

GIB = 2**30
# A 104M Llama as bench/zero_memory.py builds it (8 layers, hidden 1024, the builtin:tiny vocabulary).
BENCH_SHAPE = ModelShape(103.8e6, "config", 1024, 8, 519)


def spec_of(**spec: Any) -> api.RLHFJobSpec:
    base: dict[str, Any] = {"algorithm": "sft", "model": {"actor": "m"}, "data": {"train": "t.jsonl"}}
    return api.parse_job(
        {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "t"}, "spec": base | spec}
    ).spec


def host(spec: api.RLHFJobSpec, shape: ModelShape = BENCH_SHAPE) -> memory.Estimate:
    return memory.host_trainer_estimate(spec, spec.actor, shape)


def test_a_zero3_rank_shrinks_with_the_world_but_keeps_the_gathered_module() -> None:
    two, eight = (host(spec_of(actor={"replicas": n, "zeroStage": 3})) for n in (2, 8))
    for part in ("weights", "master weights", "gradients", "optimizer", "optimizer step"):
        assert eight.parts[part] == pytest.approx(two.parts[part] / 4), part
    assert eight.parts["gathered weights"] == two.parts["gathered weights"] == 4 * BENCH_SHAPE.parameters
    assert eight.total < two.total


def test_on_cpu_zero2_keeps_the_whole_module_and_zero3_adds_the_gathered_copy_to_the_shards() -> None:
    z2, z3 = (host(spec_of(actor={"replicas": 2, "zeroStage": z})) for z in (2, 3))
    p = BENCH_SHAPE.parameters
    assert z2.parts["weights"] == 4 * p and "gathered weights" not in z2.parts  # fp32 on CPU
    assert z3.parts["weights"] == 2 * p and z3.parts["gathered weights"] == 4 * p
    assert z3.total > z2.total  # why the warning's first fix for a ZeRO-3 run on CPU is ZeRO-2


def test_bf16_on_cpu_halves_the_module_but_not_the_fp32_master_or_adam() -> None:
    fp32, bf16 = host(spec_of(actor={"replicas": 2})), host(spec_of(actor={"replicas": 2}, precision="bf16"))
    assert bf16.parts["weights"] == fp32.parts["weights"] / 2
    assert bf16.parts["gradients"] == fp32.parts["gradients"] / 2
    for part in ("master weights", "optimizer", "optimizer step"):
        assert bf16.parts[part] == fp32.parts[part], part


def test_offload_moves_the_optimizer_off_the_gpu_and_changes_nothing_on_a_cpu_host() -> None:
    shape = ModelShape(8e9, "hint")
    plain, offloaded = (
        spec_of(actor={"replicas": 4, "zeroStage": 2, "offloadOptimizer": o}) for o in (False, True)
    )
    assert memory.trainer_estimate(plain, plain.actor, shape).parts["optimizer"] == 12 * 8e9 / 4
    assert memory.trainer_estimate(offloaded, offloaded.actor, shape).parts["optimizer"] == 0
    assert host(offloaded, shape).total == host(plain, shape).total  # the host held it already


def test_the_gpu_estimate_counts_zero3s_gathered_bf16_weights_up_to_max_live_parameters() -> None:
    spec = spec_of(actor={"replicas": 64, "zeroStage": 3})
    small, big = ModelShape(135e6, "hint"), ModelShape(70e9, "hint")
    assert memory.trainer_estimate(spec, spec.actor, small).parts["gathered weights"] == 2 * 135e6
    assert memory.trainer_estimate(spec, spec.actor, big).parts["gathered weights"] == (
        2 * memory.STAGE3_MAX_LIVE_PARAMETERS
    )
    z2 = spec_of(actor={"replicas": 64, "zeroStage": 2})
    assert "gathered weights" not in memory.trainer_estimate(z2, z2.actor, big).parts


def test_offline_activations_follow_data_max_length_and_online_ones_prompt_plus_response() -> None:
    short, long = (
        host(spec_of(actor={"replicas": 2}, data={"train": "t.jsonl", "maxLength": n})) for n in (128, 512)
    )
    assert long.parts["activations"] == pytest.approx(4 * short.parts["activations"])
    online = spec_of(algorithm="grpo", data={"prompts": "p.jsonl", "maxPromptTokens": 64, "maxNewTokens": 64},
                     reward={"function": "r.py:f"})
    assert memory.sequence_length(online) == 128 and memory.logit_tokens(online) == 64


def test_the_host_warning_names_the_role_the_estimate_the_limit_and_a_fix_that_fits() -> None:
    spec = spec_of(actor={"replicas": 2, "zeroStage": 3, "globalBatchSize": 4, "microBatchSize": 1})
    need = 2 * host(spec).total
    assert memory.host_memory_problem(spec, BENCH_SHAPE, need * 1.01, "this machine") is None
    available = need * 0.95
    warning = memory.host_memory_problem(spec, BENCH_SHAPE, available, "the container's memory limit")
    assert warning is not None and warning.startswith("spec.actor: its 2 DeepSpeed ranks need about ")
    assert f"{need / GIB:.1f} GiB" in warning and f"{available / GIB:.1f} GiB of the container's" in warning
    assert "set actor.zeroStage: 2" in warning
    # The fix it names fits: ZeRO-2 over the same ranks is within the limit.
    z2 = spec_of(actor={"replicas": 2, "zeroStage": 2, "globalBatchSize": 4, "microBatchSize": 1})
    assert 2 * host(z2).total <= available
    hopeless = memory.host_memory_problem(spec, ModelShape(70e9, "name"), available, "this machine")
    assert hopeless is not None and "use a smaller model" in hopeless


def test_the_host_warning_counts_the_critic_of_ppo_and_stays_quiet_without_a_size() -> None:
    spec = spec_of(algorithm="ppo", data={"prompts": "p.jsonl"}, reward={"function": "r.py:f"},
                   actor={"replicas": 1}, critic={"replicas": 3})
    need = memory.host_trainers_bytes(spec, BENCH_SHAPE)
    assert set(need) == {"actor", "critic"} and need["critic"] > need["actor"]
    warning = memory.host_memory_problem(spec, BENCH_SHAPE, sum(need.values()) / 2, "this machine")
    assert warning is not None and warning.startswith("spec.critic: its 3 DeepSpeed ranks")
    assert "actor" in warning  # the other trainer's share is named too
    assert memory.host_memory_problem(spec, ModelShape(0.0, "unknown"), 1.0, "this machine") is None
