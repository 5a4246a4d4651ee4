"""Every extension seam's name table covers exactly what the API lets a spec name, and the typed
actor handles call only methods their worker classes have, with the same parameters."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import get_args

import pytest

from kuberlhf import api
from kuberlhf.placement import resolve_transport
from kuberlhf_workers.base.transports import TRANSPORTS
from kuberlhf_workers.control import handles
from kuberlhf_workers.control.run import PROGRAMS
from kuberlhf_workers.rewards.sources import REWARD_SOURCES
from kuberlhf_workers.rewards.worker import RewardWorker
from kuberlhf_workers.rollout.backend import BACKENDS
from kuberlhf_workers.rollout.worker import RolloutWorker
from kuberlhf_workers.training.algorithms import ESTIMATORS, GROUP_BASELINES
from kuberlhf_workers.training.objectives import OBJECTIVES
from kuberlhf_workers.training.offline import OFFLINE_OBJECTIVES, OfflineTrainerWorker
from kuberlhf_workers.training.reference import ReferenceWorker
from kuberlhf_workers.training.trainer import TrainerWorker

pytestmark = pytest.mark.unit


def _field_literal(model: type, field: str) -> set[str]:
    return set(get_args(model.model_fields[field].annotation))  # type: ignore[attr-defined]


def test_every_algorithm_has_traits_and_an_estimator() -> None:
    assert set(api.ALGORITHMS) == set(get_args(api.Algorithm))
    assert set(ESTIMATORS) == set(api.ONLINE_ALGORITHMS)
    assert set(OFFLINE_OBJECTIVES) == set(api.OFFLINE_ALGORITHMS)
    assert set(GROUP_BASELINES) == set(api.GROUP_ALGORITHMS)
    assert {t.program for t in api.ALGORITHMS.values()} <= set(PROGRAMS) == set(get_args(api.Program))


def test_the_spec_fields_name_exactly_the_implemented_backends_transports_and_sources() -> None:
    assert set(BACKENDS) == set(get_args(api.EngineName))
    engines = _field_literal(api.RolloutSpec, "engine")
    assert engines == set(get_args(api.RolloutEngine)) == {"auto", *BACKENDS}
    assert set(TRANSPORTS) == set(get_args(api.WeightTransportName))
    assert _field_literal(api.WeightSyncSpec, "transport") == {"auto", *TRANSPORTS}
    assert set(REWARD_SOURCES) == set(get_args(api.RewardSource))
    assert set(get_args(api.RewardSource)) <= set(api.RewardSpec.model_fields)
    assert set(OBJECTIVES) == set(get_args(api.TrainerRole))


def test_auto_resolves_to_an_implemented_transport_on_cpu_and_gpu() -> None:
    resolved = {resolve_transport("auto", on_gpu=False), resolve_transport("auto", on_gpu=True)}
    assert resolved <= set(TRANSPORTS)


def test_the_critic_rules_and_the_topology_follow_the_traits() -> None:
    base = {"model": {"actor": "m"}, "reward": {"function": "r.py:f"}, "rollout": {"samplesPerPrompt": 2}}
    for name, traits in api.ALGORITHMS.items():
        job = {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "t"},
               "spec": {**base, "algorithm": name, "critic": {}}}
        if traits.critic:
            api.parse_job(job)
        else:
            with pytest.raises(api.SpecError, match=r"spec\.critic"):
                api.parse_job(job)


WORKERS = {
    handles.RolloutHandle: RolloutWorker,
    handles.TrainerHandle: TrainerWorker,
    handles.OfflineTrainerHandle: OfflineTrainerWorker,
    handles.ReferenceHandle: ReferenceWorker,
    handles.RewardHandle: RewardWorker,
}
LOCAL = {"kill"}  # handle methods that act on the actor itself, not remote calls


@pytest.mark.parametrize("handle", list(WORKERS), ids=lambda h: h.__name__)
def test_each_handle_method_is_a_method_of_its_worker_with_the_same_parameters(handle: type) -> None:
    worker = WORKERS[handle]
    methods = [n for n, _ in inspect.getmembers(handle, inspect.isfunction) if not n.startswith("_")]
    assert "ready" in methods
    for name in set(methods) - LOCAL:
        assert hasattr(worker, name), f"{handle.__name__}.{name}: {worker.__name__} has no such method"
        theirs = list(inspect.signature(getattr(worker, name)).parameters)
        ours = list(inspect.signature(getattr(handle, name)).parameters)
        assert ours == theirs, f"{handle.__name__}.{name}{ours} != {worker.__name__}.{name}{theirs}"


def test_the_controller_calls_its_workers_only_through_handles() -> None:
    control = Path(handles.__file__).parent
    remote_call = re.compile(r"\.\w+\.remote\(")  # actor.method.remote(...), not creating an actor
    offenders = {p.name: remote_call.findall(p.read_text()) for p in control.glob("*.py")}
    assert {k: v for k, v in offenders.items() if v and k != "handles.py"} == {}
    assert remote_call.search((control / "handles.py").read_text()), "the pattern finds calls where they are"
