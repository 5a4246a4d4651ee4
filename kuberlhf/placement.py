"""Where every rank of a job runs, which process groups join them, and whether it fits: one plan,
computed from the spec alone, that the operator's pods, the driver's Ray placement and
`kuberlhf plan` all read.

The layout follows OpenRLHF's hybrid engine. Each pod group (`topology.worker_groups`) gets one
Ray placement group with one bundle per GPU (one per pod on CPU). Rank i of every role hosted
there sits on bundle i and takes an equal share of it, so colocated roles share a GPU only
across process groups, never two ranks of one world; a tensor-parallel engine's workers take
consecutive bundles, one GPU each.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from kuberlhf import memory, topology
from kuberlhf.api import Resources, RLHFJobSpec, TrainerSpec, WeightTransportChoice, WeightTransportName
from kuberlhf.modelsize import ModelShape, model_shape
from kuberlhf.quantity import parse_quantity

Role = Literal["actor", "critic", "reference", "rollout", "reward"]
# nvidia.com/gpu.product labels (GPU feature discovery) and each product's memory in GiB.
GPU_PRODUCTS_GIB = {
    "NVIDIA-H200": 141,
    "NVIDIA-H100-80GB-HBM3": 80,
    "NVIDIA-H100-NVL": 94,
    "NVIDIA-H100-PCIe": 80,
    "NVIDIA-A100-SXM4-80GB": 80,
    "NVIDIA-A100-SXM4-40GB": 40,
    "NVIDIA-A100-PCIE-40GB": 40,
    "NVIDIA-L40S": 48,
    "NVIDIA-L4": 24,
    "NVIDIA-A10G": 24,
    "Tesla-T4": 16,
    "NVIDIA-B200": 180,
}


@dataclass(frozen=True)
class Pod:
    name: str
    group: str
    gpus: int

    @property
    def slots(self) -> int:
        """Bundles (and processes) the pod holds: one per GPU, one on CPU."""
        return max(self.gpus, 1)


@dataclass(frozen=True)
class Rank:
    """One process: `rank` within process group `world`, on `pod` (GPU `gpu`, None on CPU) and
    bundle `bundle` of its pod group's placement group, taking `share` of that bundle."""

    role: Role
    rank: int
    world: str
    pod: str
    gpu: int | None
    bundle: int | None
    share: float
    engine: int | None = None


@dataclass(frozen=True)
class Member:
    pod: str
    gpu: int | None


@dataclass(frozen=True)
class ProcessGroup:
    name: str
    kind: Literal["deepspeed", "tensor-parallel", "weight-sync"]
    members: tuple[Member, ...]
    transport: str


@dataclass(frozen=True)
class GpuMemory:
    pod: str
    gpu: int
    estimate_gib: float
    parts_gib: dict[str, float]
    capacity_gib: float | None


@dataclass
class Plan:
    pods: list[Pod]
    ranks: list[Rank]
    groups: list[ProcessGroup]
    memory: list[GpuMemory]
    model: ModelShape
    problems: list[str] = field(default_factory=list)

    def ranks_of(self, role: Role) -> list[Rank]:
        return [r for r in self.ranks if r.role == role]

    def to_json(self) -> dict[str, Any]:
        def camel(d: dict[str, Any]) -> dict[str, Any]:
            keys = {"estimate_gib": "estimateGiB", "parts_gib": "partsGiB", "capacity_gib": "capacityGiB"}
            return {keys.get(k, k): v for k, v in d.items() if v is not None or k in ("gpu",)}

        return {
            "pods": [asdict(p) for p in self.pods],
            "ranks": [camel(asdict(r)) for r in self.ranks],
            "groups": [
                {
                    "name": g.name,
                    "kind": g.kind,
                    "transport": g.transport,
                    "members": [asdict(m) for m in g.members],
                }
                for g in self.groups
            ],
            "memory": [camel(asdict(m)) for m in self.memory],
            "model": {"parameters": self.model.parameters, "source": self.model.source},
            "problems": list(self.problems),
        }


def host_group(spec: RLHFJobSpec, role: Role) -> str | None:
    """The pod group a role's ranks run on (None: a light actor on the head, such as a reward
    function's worker)."""
    if role == "rollout":
        return "actor" if spec.placement == "colocate" else "rollout"
    if role == "reference":
        return "actor" if spec.reference.colocate_with_actor else "reference"
    if role == "reward":
        return "reward" if topology.reward_has_own_group(spec) else None
    return role


def resolve_transport(
    transport: WeightTransportChoice, on_gpu: bool, *, colocated: bool = False, tensor_parallel: int = 1
) -> WeightTransportName:
    """spec.weightSync.transport with `auto` made concrete: NCCL from trainer GPU to engine GPUs;
    gloo on CPU, when the engines share the trainers' GPUs (NCCL refuses two members on one GPU)
    and when a tensor-parallel engine receives in its actor (which holds no GPU)."""
    if transport == "auto":
        return "nccl" if on_gpu and not colocated and tensor_parallel == 1 else "gloo"
    if transport == "nccl" and not on_gpu:
        raise ValueError("spec.weightSync.transport: nccl needs GPUs; use gloo, object-store or auto on CPU")
    return transport


def weight_sync_transport(spec: RLHFJobSpec) -> WeightTransportName:
    """The transport this spec's weight sync uses (the driver's and the plan's one answer)."""
    return resolve_transport(
        spec.weight_sync.transport,
        spec.actor.resources.gpus > 0,
        colocated=spec.placement == "colocate",
        tensor_parallel=spec.rollout.tensor_parallel_size,
    )


def _trainer_role(spec: RLHFJobSpec, role: Role) -> TrainerSpec | None:
    if role == "actor":
        return spec.actor
    if role == "critic":
        return spec.critic or spec.actor
    return None


def plan(spec: RLHFJobSpec, shape: ModelShape, gpu_memory_override_gib: float | None = None) -> Plan:
    """The whole placement of `spec`; `problems` names every reason it cannot run as written."""
    problems: list[str] = []
    pods: list[Pod] = []
    slots: dict[str, list[tuple[str, int | None]]] = {}
    capacity: dict[str, float | None] = {}
    for group in topology.worker_groups(spec):
        capacity[group.role] = gpu_memory_gib(spec, group.resources, gpu_memory_override_gib)
        units = group.resources.slots
        names = [f"{group.role}-{i}" for i in range(group.replicas)]
        pods += [Pod(n, group.role, group.resources.gpus) for n in names]
        slots[group.role] = [(n, k if group.resources.gpus else None) for n in names for k in range(units)]

    placed: list[tuple[Role, int, str, int, int | None]] = []  # role, rank, world, slot index, engine

    def place(
        role: Role, count: int, world: str, field_: str, engine: int | None = None, first: int = 0
    ) -> None:
        host = host_group(spec, role)
        if host is None:
            return
        available = len(slots.get(host, []))
        for i in range(count):
            if first + i >= available:
                problems.append(
                    f"{field_}: {role} needs {first + count} GPU slots on the {host} pods but they "
                    f"have {available}; add {host} replicas or GPUs"
                )
                return
            placed.append((role, i, world, first + i, engine))

    for role in ("actor", "critic"):
        trainer = _trainer_role(spec, role)
        if trainer is None or (role == "critic" and not topology.uses_critic(spec)):
            continue
        place(role, trainer.world_size, role, f"spec.{role}.replicas")
    if topology.uses_reference(spec):
        place("reference", topology.reference_world(spec), "reference", "spec.reference.replicas")
    tp = spec.rollout.tensor_parallel_size
    for engine in range(spec.rollout.replicas if topology.is_online(spec) else 0):
        place("rollout", tp, f"rollout-{engine}", "spec.rollout.replicas", engine, first=engine * tp)
    if spec.reward is not None and topology.reward_has_own_group(spec):
        servers = spec.reward.replicas * spec.reward.resources.slots
        place("reward", servers, "reward", "spec.reward.replicas")

    # Equal shares of each bundle among the ranks on it (only hosted roles were placed).
    hosts = {role: host for role in {p[0] for p in placed} if (host := host_group(spec, role)) is not None}
    per_slot: dict[tuple[str, int], int] = {}
    for role, _, _, index, _ in placed:
        key = (hosts[role], index)
        per_slot[key] = per_slot.get(key, 0) + 1
    ranks = []
    for role, rank, world, index, of_engine in placed:
        host = hosts[role]
        pod, gpu = slots[host][index]
        ranks.append(Rank(role, rank, world, pod, gpu, index, 1.0 / per_slot[(host, index)], of_engine))

    groups = _process_groups(spec, ranks)
    try:
        if topology.is_online(spec):
            weight_sync_transport(spec)
    except ValueError as exc:
        problems.append(str(exc))
    problems += _group_problems(groups)
    memory_rows = _memory(spec, shape, ranks, {p.name: capacity[p.group] for p in pods})
    problems += _memory_problems(memory_rows)
    return Plan(pods, ranks, groups, memory_rows, shape, list(dict.fromkeys(problems)))


def _process_groups(spec: RLHFJobSpec, ranks: list[Rank]) -> list[ProcessGroup]:
    worlds: dict[str, list[Rank]] = {}
    for r in ranks:
        worlds.setdefault(r.world, []).append(r)
    groups = []
    sharded_reference = ("reference",) if spec.reference.zero_stage == 3 else ()  # a ZeRO-3 world
    for name in ("actor", "critic", *sharded_reference):
        if name in worlds:
            # Each trainer's DeepSpeed picks its collective from its own pods' accelerator: a
            # critic on CPU pods uses gloo even when the actor trains on GPUs.
            members = tuple(Member(r.pod, r.gpu) for r in worlds[name])
            collective = "nccl" if all(m.gpu is not None for m in members) else "gloo"
            groups.append(ProcessGroup(name, "deepspeed", members, collective))
    engines = [r for r in ranks if r.role == "rollout"]
    tp = spec.rollout.tensor_parallel_size
    if tp > 1:
        for engine in sorted({r.engine for r in engines if r.engine is not None}):
            members = tuple(Member(r.pod, r.gpu) for r in engines if r.engine == engine)
            groups.append(ProcessGroup(f"rollout-{engine}", "tensor-parallel", members, "nccl"))
    if not topology.is_online(spec):
        return groups  # offline: no engines, no weight sync
    # Trainer rank 0 sends; each engine's receiving process is its actor (TP worker 0's slot,
    # without a GPU of its own when the engine is tensor-parallel: vLLM's workers hold the GPUs).
    actor0 = next(r for r in ranks if r.role == "actor" and r.rank == 0)
    receivers = [Member(r.pod, r.gpu if tp == 1 else None) for r in engines if r.rank == 0]
    try:
        transport: str = weight_sync_transport(spec)
    except ValueError:  # plan() reports it
        transport = spec.weight_sync.transport
    groups.append(
        ProcessGroup("weight-sync", "weight-sync", (Member(actor0.pod, actor0.gpu), *receivers), transport)
    )
    return groups


def _group_problems(groups: list[ProcessGroup]) -> list[str]:
    problems = []
    for group in groups:
        if group.transport != "nccl":
            continue
        seen: set[tuple[str, int | None]] = set()
        gpuless = [m.pod for m in group.members if m.gpu is None]
        if gpuless:
            problems.append(
                f"spec.weightSync.transport: NCCL group {group.name} has {len(gpuless)} member(s) without "
                f"a GPU (on {', '.join(gpuless[:3])}{', ...' if len(gpuless) > 3 else ''}: a tensor-parallel "
                "vLLM engine receives in its actor, which holds no GPU); use weightSync.transport: gloo "
                "or object-store"
            )
        for m in group.members:
            key = (m.pod, m.gpu)
            if m.gpu is None:
                continue
            if key in seen:
                fix = (
                    "use weightSync.transport: auto (gloo while the engines share the trainers' GPUs)"
                    if group.kind == "weight-sync"
                    else "give every rank its own GPU"
                )
                problems.append(
                    f"spec.placement: NCCL group {group.name} has two members on {m.pod} GPU {m.gpu}, "
                    f"which NCCL refuses; {fix}"
                )
            seen.add(key)
    return problems


def _estimate(spec: RLHFJobSpec, shape: ModelShape, role: Role, capacity: float | None) -> memory.Estimate:
    trainer = _trainer_role(spec, role)
    if trainer is not None:
        return memory.trainer_estimate(spec, trainer, shape, logits=role == "actor")
    if role == "reference":
        sharded_over = topology.reference_world(spec) if spec.reference.zero_stage == 3 else 1
        return memory.reference_estimate(spec, shape, sharded_over)
    if role == "rollout":
        return memory.rollout_estimate(spec, shape, capacity * memory.GIB if capacity else None)
    return memory.reference_estimate(spec, shape)  # a reward model scores like a reference forward


def _memory(
    spec: RLHFJobSpec, shape: ModelShape, ranks: list[Rank], capacity: dict[str, float | None]
) -> list[GpuMemory]:
    if not shape.known:
        return []
    by_gpu: dict[tuple[str, int], dict[str, float]] = {}
    for r in ranks:
        if r.gpu is None:
            continue
        parts = by_gpu.setdefault((r.pod, r.gpu), {})
        est = _estimate(spec, shape, r.role, capacity[r.pod]).gib()
        parts[r.role] = parts.get(r.role, 0.0) + est
    return [
        GpuMemory(pod, gpu, round(sum(p.values()), 2), {k: round(v, 2) for k, v in p.items()}, capacity[pod])
        for (pod, gpu), p in by_gpu.items()
    ]


FIXES = {
    "actor": "raise actor.replicas with zeroStage: 3, set offloadOptimizer: true, "
    "gradientCheckpointing: true "
    "or a smaller microBatchSize",
    "critic": "raise critic.replicas with zeroStage: 3, set offloadOptimizer: true or "
    "gradientCheckpointing: true",
    "reference": "shard it with reference.zeroStage: 3 (over more reference.replicas when not colocated), "
    "give the reference its own GPUs (reference.colocateWithActor: false) or use a smaller reference",
    "rollout": "lower rollout.gpuMemoryUtilization or raise rollout.tensorParallelSize",
    "reward": "use a smaller reward model",
}


def _memory_problems(rows: list[GpuMemory]) -> list[str]:
    problems = []
    for row in rows:
        if row.capacity_gib is None or row.estimate_gib <= row.capacity_gib:
            continue
        biggest = max(row.parts_gib, key=lambda k: row.parts_gib[k])
        roles = ", ".join(f"{k} {v:.1f}" for k, v in sorted(row.parts_gib.items(), key=lambda kv: -kv[1]))
        problems.append(
            f"spec.{biggest}: {row.pod} GPU {row.gpu} needs about {row.estimate_gib:.1f} GiB "
            f"({roles} GiB) but has {row.capacity_gib:g} GiB; {FIXES[biggest]}"
        )
        break  # pods of a group are alike: one line names the fix
    return problems


def gpu_memory_gib(
    spec: RLHFJobSpec, resources: Resources, override_gib: float | None = None
) -> float | None:
    """GPU memory to check a pod group's estimate against: `--gpu-memory`, else the group's
    `resources.gpuMemory`, else a known nvidia.com/gpu.product in the spec's nodeSelector, else
    unknown (the estimate is then shown but not checked)."""
    if override_gib is not None:
        return override_gib
    if resources.gpu_memory is not None:
        try:
            return float(parse_quantity(resources.gpu_memory)) / memory.GIB
        except ValueError:
            return None  # the operator's quantity check names the field
    product = spec.node_selector.get("nvidia.com/gpu.product")
    return float(GPU_PRODUCTS_GIB[product]) if product in GPU_PRODUCTS_GIB else None


def plan_for(
    spec: RLHFJobSpec, *, read_files: bool = False, gpu_memory_override_gib: float | None = None
) -> Plan:
    """The plan with the best model shape knowable here (`read_files`: a local or cached config)."""
    shape = model_shape(spec.model.actor, spec.model.size, read_files=read_files)
    return plan(spec, shape, gpu_memory_override_gib)


def render_table(plan: Plan) -> str:
    """The plan for people: one line per GPU (or CPU pod) with what runs there, then the groups."""
    by_slot: dict[tuple[str, int | None], list[Rank]] = {}
    for r in plan.ranks:
        by_slot.setdefault((r.pod, r.gpu), []).append(r)
    estimates = {(m.pod, m.gpu): m for m in plan.memory}
    rows = [("POD", "GPU", "RANKS", "EST GiB", "OF GiB")]
    for (pod, gpu), ranks in by_slot.items():
        names = ", ".join(
            f"{r.role} {r.engine}.{r.rank}" if r.engine is not None else f"{r.role} {r.rank}" for r in ranks
        )
        est = estimates.get((pod, gpu)) if gpu is not None else None
        rows.append(
            (
                pod,
                "-" if gpu is None else str(gpu),
                names,
                f"{est.estimate_gib:.1f}" if est else "-",
                f"{est.capacity_gib:g}" if est and est.capacity_gib else "?",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.append("")
    lines.append("PROCESS GROUP     KIND             TRANSPORT     MEMBERS")
    for g in plan.groups:
        members = " ".join(f"{m.pod}:{'-' if m.gpu is None else m.gpu}" for m in g.members)
        lines.append(f"{g.name:<17} {g.kind:<16} {g.transport:<13} {members}")
    return "\n".join(lines)
