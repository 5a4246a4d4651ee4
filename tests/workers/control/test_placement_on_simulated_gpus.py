"""The driver's real placement code on a simulated GPU cluster: Ray nodes on this host that mirror
the pods of the rendered RayJob (their GPUs and custom resources), actor groups started by
`control.groups` in the seats of the plan, and the truth read from inside each actor (its node
and `ray.get_gpu_ids()`, which Ray assigns for declared GPUs as it does for real ones).

Probe actors stand in for the workers (an 8B model cannot load here); what is under test is
where they land. A tensor-parallel engine's workers are started the way vLLM's Ray executor
starts them: in the bundles its seat names, with the GPU share it names.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kuberlhf import api, placement, topology
from kuberlhf.placement import Plan, plan_for
from kuberlhf.seats import seats_for
from kuberlhf_workers.control.groups import Placements, start_group
from kuberlhf_workers.control.handles import Handle

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]
ROLES: tuple[placement.Role, ...] = ("actor", "critic", "reference", "rollout", "reward")


class Probe:
    def ready(self) -> bool:
        return True

    def where(self) -> tuple[str, list[int]]:
        import ray

        return ray.get_runtime_context().get_node_id(), [int(g) for g in ray.get_gpu_ids()]


@pytest.fixture(scope="module")
def cluster() -> Any:
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # The workers cannot import this test module: ship Probe's code with it.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    sim = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    ray.init(address=sim.address, log_to_driver=False)
    yield sim
    ray.shutdown()
    sim.shutdown()


def observe(cluster: Any, spec: api.RLHFJobSpec, plan: Plan) -> dict[tuple[str, int, int | None], Any]:
    """{(role, rank, engine): (node id, gpu ids, node resources)} for every placed rank."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    nodes = [
        cluster.add_node(
            wait=False,
            num_cpus=1,
            num_gpus=pod.gpus,
            resources={topology.resource_name(pod.group): float(max(pod.gpus, 1))},
        )
        for pod in plan.pods
    ]
    cluster.wait_for_nodes()
    placements = Placements(plan, "sim")
    handles: list[tuple[tuple[str, int, int | None], Any]] = []
    try:
        for role in ROLES:
            if not plan.ranks_of(role):
                continue
            seats = seats_for(plan, spec, role)
            group = start_group(
                Probe, seats, placements, lambda i: (), lambda a, i, role=role: Handle(a, f"{role} {i}")
            )
            ranks = plan.ranks_of(role)
            if role != "rollout" or spec.rollout.tensor_parallel_size == 1:
                keys = [(r.role, r.rank, r.engine) for r in ranks]
                handles += list(zip(keys, [h.actor for h in group.actors], strict=True))
                continue
            for engine, seat in enumerate(seats):  # as vLLM's Ray executor would, from the seat's env
                share = float(seat.env["VLLM_RAY_PER_WORKER_GPUS"])
                for rank, bundle in enumerate(int(b) for b in seat.env["VLLM_RAY_BUNDLE_INDICES"].split(",")):
                    worker = (
                        ray.remote(Probe)
                        .options(
                            num_cpus=0,
                            num_gpus=share,
                            scheduling_strategy=PlacementGroupSchedulingStrategy(
                                placements.get("actor" if spec.placement == "colocate" else "rollout"),
                                placement_group_bundle_index=bundle,
                            ),
                        )
                        .remote()
                    )
                    handles.append((("rollout", rank, engine), worker))
        found = ray.get([actor.where.remote() for _, actor in handles], timeout=300)
        resources = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
        return {
            key: (node, gpus, resources[node]) for (key, _), (node, gpus) in zip(handles, found, strict=True)
        }
    finally:
        for _, actor in handles:
            ray.kill(actor)
        placements.remove()
        for node in nodes:
            cluster.remove_node(node)


def assert_placed_as_planned(
    spec: api.RLHFJobSpec, plan: Plan, seen: dict[tuple[str, int, int | None], Any]
) -> None:
    pod_to_node: dict[str, str] = {}
    slot_to_gpu: dict[tuple[str, int | None], tuple[str, int | None]] = {}
    for r in plan.ranks:
        key = (r.role, r.rank, r.engine)
        if placement.host_group(spec, r.role) is None:
            continue
        node, gpus, resources = seen[key]
        host = placement.host_group(spec, r.role)
        assert topology.resource_name(host) in resources, f"{key} landed on a node that is not a {host} pod"
        if r.gpu is None:
            assert gpus == [], key
            actual: tuple[str, int | None] = (node, None)
        else:
            assert len(gpus) == 1, f"{key} sees GPUs {gpus}"
            actual = (node, gpus[0])
        assert pod_to_node.setdefault(r.pod, node) == node, f"ranks of pod {r.pod} split over nodes"
        assert slot_to_gpu.setdefault((r.pod, r.gpu), actual) == actual, (
            f"{key} is not where its slot-mates are"
        )
    assert len(set(pod_to_node.values())) == len(pod_to_node), "two pods of the plan share a node"
    assert len(set(slot_to_gpu.values())) == len(slot_to_gpu), "two GPUs of the plan are one GPU"
    # From inside the actors: no NCCL world with two members on one (node, GPU).
    for group in plan.groups:
        if group.transport == "nccl":
            members = [slot_to_gpu[(m.pod, m.gpu)] for m in group.members]
            assert len(set(members)) == len(members), f"duplicate GPU in {group.name}"


def spec_of(doc: dict[str, Any]) -> api.RLHFJobSpec:
    return api.parse_job(doc).spec


def example(name: str) -> dict[str, Any]:
    path = ROOT / ("bench/specs" if name == "gpu-grpo" else "examples") / f"{name}.yaml"
    doc = yaml.safe_load(path.read_text())
    if name == "gpu-grpo":
        doc["spec"]["reward"]["function"] = "r.py:reward"
    return doc


def scaled_72b() -> dict[str, Any]:
    """The 72B example's layout at an eighth of its size: colocated TP-4 engines spanning 8-GPU pods."""
    doc = example("qwen2.5-72b-grpo-colocate")
    doc["spec"]["actor"] |= {"replicas": 1, "globalBatchSize": 8}
    doc["spec"]["rollout"] |= {"replicas": 2}
    doc["spec"]["nodeSelector"] = {}  # the layout is under test; ZeRO-3 over 8 GPUs would not fit 80 GiB
    return doc


def tp2_colocate() -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": "tp2"},
        "spec": {
            "model": {"actor": "org/Model-7B"},
            "reward": {"function": "r.py:f"},
            "placement": "colocate",
            "rollout": {"engine": "vllm", "replicas": 2, "tensorParallelSize": 2, "resources": {"gpus": 2}},
            "actor": {"replicas": 2, "resources": {"gpus": 2}},
            "kl": {"coef": 0.01},
        },
    }


# The CPU examples' placement is exercised by every driver test; these are the GPU layouts.
CASES = {
    "gpu-grpo (1 GPU, colocate)": lambda: example("gpu-grpo"),
    "llama3-8b-ppo-rm": lambda: example("llama3-8b-ppo-rm"),
    "tp2 colocate with a reference": tp2_colocate,
    "qwen2.5-72b layout, scaled": scaled_72b,
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_real_actors_land_exactly_where_the_plan_puts_them(cluster: Any, case: str) -> None:
    spec = spec_of(CASES[case]())
    plan = plan_for(spec)
    assert plan.problems == []
    assert_placed_as_planned(spec, plan, observe(cluster, spec, plan))


@st.composite
def small_gpu_specs(draw: st.DrawFn) -> dict[str, Any]:
    """Layouts of up to 8 GPUs over up to 4 pods: separate or colocated, TP 1 or 2, KL on or off."""
    colocate, tp = draw(st.booleans()), draw(st.sampled_from([1, 2]))
    pods, gpus = draw(st.sampled_from([(1, 2), (2, 2), (2, 4), (4, 1)]))
    engines = pods * gpus // tp if colocate else draw(st.integers(1, 2))
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": "gen"},
        "spec": {
            "model": {"actor": "org/Model-1B"},
            "reward": {"function": "r.py:f"},
            "placement": "colocate" if colocate else "separate",
            "rollout": {
                "engine": "vllm",
                "replicas": engines,
                "tensorParallelSize": tp,
                "resources": {"gpus": tp},
            },
            "actor": {"replicas": pods, "resources": {"gpus": gpus}, "microBatchSize": 1},
            "kl": {"coef": draw(st.sampled_from([0.0, 0.01]))},
            "weightSync": {"transport": "object-store" if tp > 1 else "auto"},
        },
    }


@settings(max_examples=2, deadline=None, suppress_health_check=list(HealthCheck))
@given(doc=small_gpu_specs())
def test_generated_layouts_land_where_the_plan_puts_them(cluster: Any, doc: dict[str, Any]) -> None:
    spec = spec_of(doc)
    plan = plan_for(spec)
    assert plan.problems == []
    assert_placed_as_planned(spec, plan, observe(cluster, spec, plan))
