"""The placement plan: every rank on a GPU of its own within each process group, colocated roles
sharing GPUs only across groups, and memory estimates that refuse what cannot fit."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kuberlhf import api, placement, topology
from kuberlhf.modelsize import ModelShape, model_shape, parameters_of, parse_size
from kuberlhf.placement import Plan, plan_for
from kuberlhf.seats import bundles, seats_for

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
SPECS = [*sorted((ROOT / "examples").glob("*.yaml")), ROOT / "bench" / "specs" / "gpu-grpo.yaml"]


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def job(doc: dict[str, Any]) -> api.RLHFJob:
    return api.parse_job(doc)


def spec_of(**spec: Any) -> api.RLHFJobSpec:
    base: dict[str, Any] = {"model": {"actor": "org/Model-7B"}, "reward": {"function": "r.py:f"}}
    return job(
        {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "t"}, "spec": base | spec}
    ).spec


def assert_invariants(plan: Plan) -> None:
    """What NCCL and vLLM need: distinct GPUs within every NCCL group and every process group,
    each tensor-parallel worker on a GPU of its own, shares of a GPU summing to at most one."""
    for group in plan.groups:
        if group.transport == "nccl":
            slots = [(m.pod, m.gpu) for m in group.members]
            assert all(gpu is not None for _, gpu in slots), group
            assert len(set(slots)) == len(slots), f"duplicate GPU in NCCL group {group.name}"
    by_world: dict[str, list[tuple[str, int | None, int | None]]] = {}
    for r in plan.ranks:
        by_world.setdefault(r.world, []).append((r.pod, r.gpu, r.bundle))
    for world, slots in by_world.items():
        assert len(set(slots)) == len(slots), f"two ranks of {world} share a slot"
    use: dict[tuple[str, int | None, int | None], float] = {}
    for r in plan.ranks:
        key = (r.pod, r.gpu, r.bundle)
        use[key] = use.get(key, 0.0) + r.share
    assert all(v <= 1.0 + 1e-9 for v in use.values())
    pods = {p.name: p for p in plan.pods}
    for r in plan.ranks:
        assert r.pod in pods
        if r.gpu is not None:
            assert 0 <= r.gpu < pods[r.pod].gpus


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_every_example_plans_without_problems_and_keeps_the_invariants(path: Path) -> None:
    plan = plan_for(job(load(path)).spec)
    assert plan.problems == []
    assert_invariants(plan)


def test_the_8b_ppo_example_puts_each_actor_rank_and_its_reference_on_one_gpu_of_its_own_pod() -> None:
    plan = plan_for(job(load(ROOT / "examples" / "llama3-8b-ppo-rm.yaml")).spec)
    actors, refs = plan.ranks_of("actor"), plan.ranks_of("reference")
    assert [(r.pod, r.gpu) for r in actors] == [(f"actor-{i}", 0) for i in range(4)]
    assert [(r.pod, r.gpu) for r in refs] == [(r.pod, r.gpu) for r in actors]
    assert {r.share for r in actors + refs} == {0.5}
    sync = next(g for g in plan.groups if g.name == "weight-sync")
    assert sync.transport == "nccl" and len(sync.members) == 5


def test_the_one_gpu_benchmark_colocates_trainer_and_engine_and_syncs_them_without_nccl() -> None:
    doc = load(ROOT / "bench" / "specs" / "gpu-grpo.yaml")
    doc["spec"]["reward"]["function"] = "r.py:reward"
    plan = plan_for(job(doc).spec)
    assert [(r.role, r.pod, r.gpu, r.share) for r in plan.ranks] == [
        ("actor", "actor-0", 0, 0.5),
        ("rollout", "actor-0", 0, 0.5),
    ]
    assert next(g for g in plan.groups if g.name == "weight-sync").transport == "gloo"
    assert_invariants(plan)


def test_nccl_between_a_trainer_and_an_engine_on_one_gpu_is_refused_naming_the_fix() -> None:
    spec = spec_of(
        placement="colocate",
        rollout={"resources": {"gpus": 1}},
        actor={"resources": {"gpus": 1}},
        weightSync={"transport": "nccl"},
    )
    problems = plan_for(spec).problems
    assert len(problems) == 1
    assert problems[0].startswith("spec.placement: NCCL group weight-sync has two members on actor-0 GPU 0")
    assert "weightSync.transport: auto" in problems[0]


def test_a_tensor_parallel_colocated_engine_spans_consecutive_gpus_one_worker_each() -> None:
    spec = spec_of(
        placement="colocate",
        algorithm="grpo",
        rollout={"engine": "vllm", "replicas": 2, "tensorParallelSize": 2, "resources": {"gpus": 2}},
        actor={"replicas": 4, "resources": {"gpus": 1}},
    )
    plan = plan_for(spec)
    assert plan.problems == []
    assert_invariants(plan)
    engines = plan.ranks_of("rollout")
    assert [(r.engine, r.rank, r.pod) for r in engines] == [
        (0, 0, "actor-0"),
        (0, 1, "actor-1"),
        (1, 0, "actor-2"),
        (1, 1, "actor-3"),
    ]
    tp = [g for g in plan.groups if g.kind == "tensor-parallel"]
    assert [g.name for g in tp] == ["rollout-0", "rollout-1"] and all(g.transport == "nccl" for g in tp)
    seats = seats_for(plan, spec, "rollout")
    assert [s.env["VLLM_RAY_BUNDLE_INDICES"] for s in seats] == ["0,1", "2,3"]
    assert all(s.gpus == 0 for s in seats), "vLLM's workers hold the GPUs, not the engine actor"


def test_a_tensor_parallel_engine_cannot_receive_nccl_weights_in_its_gpu_less_actor() -> None:
    spec = spec_of(
        rollout={"engine": "vllm", "tensorParallelSize": 2, "resources": {"gpus": 2}},
        actor={"resources": {"gpus": 1}},
        weightSync={"transport": "nccl"},
    )
    problems = plan_for(spec).problems
    assert any("without a GPU" in p and "gloo or object-store" in p for p in problems), problems


def test_a_70b_actor_at_zero_0_on_80gib_gpus_is_refused_by_validate_naming_role_estimate_and_fix(
    tmp_path: Path,
) -> None:
    doc = {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": "big"},
        "spec": {
            "model": {"actor": "meta-llama/Llama-3.1-70B-Instruct"},
            "reward": {"function": "r.py:f"},
            "actor": {"replicas": 8, "zeroStage": 0, "resources": {"gpus": 1, "gpuMemory": "80Gi"}},
            "rollout": {"resources": {"gpus": 1}},
        },
    }
    (tmp_path / "r.py").write_text(
        "def f(prompts, completions, **kw):\n    return [0.0] * len(completions)\n"
    )
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = subprocess.run(
        [sys.executable, "-m", "kuberlhf", "validate", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 1
    line = result.stderr.strip()
    assert line.startswith(f"{path}: spec.actor: actor-0 GPU 0 needs about "), line
    estimate = float(line.split("needs about ")[1].split(" GiB")[0])
    assert estimate > 16 * 70e9 / 2**30 * 0.99  # 16 bytes per parameter, unsharded at ZeRO-0
    assert "but has 80 GiB" in line and "zeroStage: 3" in line and "offloadOptimizer" in line
    # ZeRO-3 over 64 GPUs with the optimizer offloaded fits.
    doc["spec"]["actor"] |= {"replicas": 64, "zeroStage": 3, "offloadOptimizer": True}
    doc["spec"]["rollout"] |= {"replicas": 8}
    assert plan_for(job(doc).spec).problems == []


def test_zero_stages_shard_what_they_promise() -> None:
    shape = ModelShape(1e9, "hint")
    est = {
        z: placement._estimate(spec_of(actor={"replicas": 4, "zeroStage": z}), shape, "actor", None).parts
        for z in (0, 1, 2, 3)
    }
    gb = 1e9
    assert (est[0]["weights"], est[0]["gradients"], est[0]["optimizer"]) == (2 * gb, 2 * gb, 12 * gb)
    assert est[1]["optimizer"] == 3 * gb and est[1]["gradients"] == 2 * gb
    assert est[2]["gradients"] == 0.5 * gb and est[2]["weights"] == 2 * gb
    assert est[3]["weights"] == 0.5 * gb
    offloaded = placement._estimate(
        spec_of(actor={"zeroStage": 2, "offloadOptimizer": True}), shape, "actor", None
    )
    assert offloaded.parts["optimizer"] == 0


def test_model_sizes_come_from_the_config_then_the_name_then_the_hint(tmp_path: Path) -> None:
    config = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "vocab_size": 512,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    local = model_shape(str(tmp_path))
    assert local.source == "config" and local.parameters == parameters_of(config) and local.hidden == 64
    assert model_shape(str(tmp_path), read_files=False).source == "unknown"
    assert parse_size("Qwen/Qwen2.5-72B-Instruct") == 72e9 and parse_size("SmolLM2-135M") == 135e6
    assert parse_size("Qwen2.5-0.5B") == 0.5e9 and parse_size("gpt2") is None
    assert model_shape("org/finetuned", "13B").source == "hint"
    assert model_shape("builtin:smollm2-135m").parameters == pytest.approx(134.5e6, rel=0.01)


def test_the_pods_advertise_one_unit_per_bundle_of_the_plan() -> None:
    for path in SPECS:
        spec = job(load(path)).spec
        groups = bundles(plan_for(spec))
        for group in topology.worker_groups(spec):
            units = group.replicas * group.ray_resources[topology.resource_name(group.role)]
            assert len(groups[group.role]) == units, path.name


def test_kuberlhf_plan_prints_json_with_pods_ranks_groups_memory_and_problems() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kuberlhf",
            "plan",
            str(ROOT / "examples" / "llama3-8b-ppo-rm.yaml"),
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    data = json.loads(result.stdout)
    assert {"pods", "ranks", "groups", "memory", "problems"} <= set(data)
    assert {"name": "actor-0", "group": "actor", "gpus": 1} in data["pods"]
    first = data["ranks"][0]
    assert {"role", "rank", "world", "pod", "gpu"} <= set(first)
    assert data["memory"][0]["estimateGiB"] > 0 and data["problems"] == []


# -- generated specs ------------------------------------------------------------------------------


@st.composite
def gpu_specs(draw: st.DrawFn) -> api.RLHFJobSpec:
    colocate = draw(st.booleans())
    tp = draw(st.sampled_from([1, 1, 2, 4]))
    actor_gpus = draw(st.sampled_from([4, 8, 16, 32, 64]))
    engines = max(1, actor_gpus // tp) if colocate else draw(st.integers(1, 8))
    algorithm = draw(st.sampled_from(api.ONLINE_ALGORITHMS))
    doc: dict[str, Any] = {
        "algorithm": algorithm,
        "placement": "colocate" if colocate else "separate",
        "rollout": {
            "engine": "vllm" if tp > 1 or draw(st.booleans()) else "hf",
            "replicas": engines,
            "tensorParallelSize": tp,
            "resources": {"gpus": tp},
            "samplesPerPrompt": 4,
            "promptsPerStep": 64,
        },
        "actor": {"replicas": actor_gpus, "resources": {"gpus": 1}, "zeroStage": 3, "microBatchSize": 1},
        "kl": {"coef": draw(st.sampled_from([0.0, 0.01]))},
        "reference": {"colocateWithActor": draw(st.booleans()), "replicas": 2, "resources": {"gpus": 1}},
        "weightSync": {"transport": "object-store" if tp > 1 else "auto"},
    }
    if api.ALGORITHMS[algorithm].critic:
        doc["critic"] = {"replicas": draw(st.sampled_from([2, 4, 8])), "resources": {"gpus": 1}}
    return spec_of(**doc)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gpu_specs())
def test_generated_gpu_specs_up_to_64_gpus_plan_without_problems_and_keep_the_invariants(
    spec: api.RLHFJobSpec,
) -> None:
    plan = plan_for(spec)
    assert plan.problems == [], plan.problems
    assert_invariants(plan)
    assert sum(p.gpus for p in plan.pods) >= spec.actor.replicas


def test_the_plan_is_a_deep_copy_safe_pure_function() -> None:
    spec = job(load(ROOT / "examples" / "qwen2.5-72b-grpo-colocate.yaml")).spec
    before = copy.deepcopy(spec)
    assert plan_for(spec).to_json() == plan_for(spec).to_json()
    assert spec == before


def test_a_critic_on_cpu_pods_trains_over_gloo_while_the_actor_uses_nccl() -> None:
    spec = spec_of(
        algorithm="ppo",
        placement="colocate",
        rollout={"resources": {"gpus": 1}},
        actor={"resources": {"gpus": 1}},
        critic={"resources": {"gpus": 0}},
    )
    plan = plan_for(spec)
    assert plan.problems == []
    assert {g.name: g.transport for g in plan.groups if g.kind == "deepspeed"} == {
        "actor": "nccl",
        "critic": "gloo",
    }
    assert_invariants(plan)


def test_an_offline_job_plans_only_its_trainer_ranks_and_no_weight_sync() -> None:
    doc = load(ROOT / "examples" / "offline" / "tiny-dpo.yaml")
    doc["spec"]["actor"] |= {"replicas": 2, "resources": {"gpus": 4}, "microBatchSize": 4}
    plan = plan_for(job(doc).spec)
    assert plan.problems == []
    assert {p.group for p in plan.pods} == {"actor"} and {r.role for r in plan.ranks} == {"actor"}
    assert [(g.name, g.transport, len(g.members)) for g in plan.groups] == [("actor", "nccl", 8)]
    assert_invariants(plan)


def test_a_72b_reference_that_overflows_one_gpu_is_refused_until_zero3_shards_it_over_its_own_world() -> None:
    spec: dict[str, Any] = {
        "model": {"actor": "Qwen/Qwen2.5-72B-Instruct"},
        "algorithm": "grpo",
        "kl": {"coef": 0.01},
        "actor": {"replicas": 32, "zeroStage": 3, "offloadOptimizer": True,
                  "resources": {"gpus": 1, "gpuMemory": "80Gi"}},
        "reference": {"colocateWithActor": False, "replicas": 4,
                      "resources": {"gpus": 2, "gpuMemory": "80Gi"}},
        "rollout": {"engine": "vllm", "replicas": 8, "tensorParallelSize": 4, "resources": {"gpus": 4}},
    }
    whole = plan_for(spec_of(**spec))
    refused = [p for p in whole.problems if p.startswith("spec.reference:")]
    assert refused and "reference.zeroStage: 3" in refused[0], whole.problems  # 144 GB of bf16 on one GPU
    assert "reference" not in {g.name for g in whole.groups}  # whole copies never talk to each other

    spec["reference"]["zeroStage"] = 3
    sharded = plan_for(spec_of(**spec))
    assert sharded.problems == []
    assert_invariants(sharded)
    world = next(g for g in sharded.groups if g.name == "reference")
    assert (world.kind, world.transport, len(world.members)) == ("deepspeed", "nccl", 8)
    per_gpu = [row.parts_gib["reference"] for row in sharded.memory if "reference" in row.parts_gib]
    assert len(per_gpu) == 8 and max(per_gpu) < 2 * 72.7e9 / 2**30 / 8 + 10  # an eighth, a layer, buffers
