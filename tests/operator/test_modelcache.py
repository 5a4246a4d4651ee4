"""The model cache: which pods mount it (and get HF_HOME), how big it is, and that what is rendered
is what Kubernetes and KubeRay accept. Sizes are worked out by hand: parameters × 2 bytes (bf16)
× 1.5, in GiB rounded up, plus 1 GiB for each tokenizer-only reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kuberlhf import api
from kuberlhf_operator import builders
from kuberlhf_operator.modelcache import CACHE_DIR
from tests.kuberay_schema import validate_builtin, validate_kuberay

pytestmark = pytest.mark.unit

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
UID = "0b1e2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
CACHE_ENV = {"HF_HOME": CACHE_DIR, "HF_HUB_CACHE": f"{CACHE_DIR}/hub"}


def job(example: str = "tiny-grpo.yaml", **spec: Any) -> api.RLHFJob:
    doc = yaml.safe_load((EXAMPLES / example).read_text())
    doc["metadata"]["uid"] = UID
    for key, value in spec.items():  # sections merge into the example's; a model or reward replaces it
        merge = key not in ("model", "reward") and isinstance(doc["spec"].get(key), dict)
        if merge and isinstance(value, dict):
            doc["spec"][key] = {**doc["spec"][key], **value}
        else:
            doc["spec"][key] = value
    return api.parse_job(doc)


def templates(rlhfjob: api.RLHFJob) -> dict[str, dict[str, Any]]:
    """Pod spec by role: the head, each worker group and the submitter."""
    rayjob = builders.build_rayjob(rlhfjob, "team-a")
    cluster = rayjob["spec"]["rayClusterSpec"]
    return {"head": cluster["headGroupSpec"]["template"]["spec"],
            "submitter": rayjob["spec"]["submitterPodTemplate"]["spec"],
            **{g["groupName"]: g["template"]["spec"] for g in cluster["workerGroupSpecs"]}}


def cache_of(pod: dict[str, Any]) -> dict[str, Any] | None:
    """The pod's model-cache volume, after checking its container mounts it with HF_HOME set, or that
    it has neither."""
    [container] = pod["containers"]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    volume = next((v for v in pod.get("volumes", []) if v["name"] == mounts.get(CACHE_DIR)), None)
    if volume is None:
        assert CACHE_DIR not in mounts and not set(CACHE_ENV) & set(env), container
        return None
    assert {k: env.get(k) for k in CACHE_ENV} == CACHE_ENV
    return volume


def cached_roles(rlhfjob: api.RLHFJob) -> set[str]:
    return {role for role, pod in templates(rlhfjob).items() if cache_of(pod) is not None}


def claims(rlhfjob: api.RLHFJob) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in builders.build_all(rlhfjob, "team-a")
            if o["kind"] == "PersistentVolumeClaim"}


@pytest.mark.parametrize(("model", "reward", "expected"), [
    # Hub actor, reward function: the driver's tokenizer, the engines and the trainers.
    ({"actor": "Qwen/Qwen2.5-7B"}, {"function": "rewards/digits.py:reward"}, {"head", "rollout", "actor"}),
    # Builtin actor, hub reward model: only the reward pods fetch anything.
    ({"actor": "builtin:tiny"}, {"model": "acme/rm-1.5B"}, {"reward"}),
    # Hub actor, reward model on a path: the reward pods load from their volume.
    ({"actor": "Qwen/Qwen2.5-7B"}, {"model": "/models/rm"}, {"head", "rollout", "actor"}),
    # Local actor, tokenizer from the hub: the driver and the trainers read it, the engines do not.
    ({"actor": "/models/policy", "tokenizer": "Qwen/Qwen2.5-7B"}, {"function": "rewards/digits.py:reward"},
     {"head", "actor"}),
])
def test_the_cache_and_hf_home_reach_exactly_the_containers_that_fetch_hub_models(
    model: dict[str, str], reward: dict[str, str], expected: set[str]
) -> None:
    assert cached_roles(job(model=model, reward=reward)) == expected


def test_colocated_engines_share_the_actor_pods_cache() -> None:
    rlhfjob = job("qwen2.5-72b-grpo-colocate.yaml")
    assert set(templates(rlhfjob)) == {"head", "actor", "submitter"}
    assert cached_roles(rlhfjob) == {"head", "actor"}


def test_ppo_critic_reference_and_reward_pods_each_get_the_cache() -> None:
    rlhfjob = job("llama3-8b-ppo-rm.yaml", reference={"colocateWithActor": False})
    assert cached_roles(rlhfjob) == {"head", "rollout", "actor", "critic", "reference", "reward"}


@pytest.mark.parametrize("ref", ["builtin:tiny", "/models/policy", "./policy", "pvc://models/policy",
                                 "s3://bucket/policy", "job:tiny-sft"])
def test_builtin_and_local_models_get_no_cache_and_no_claim(ref: str) -> None:
    rlhfjob = job(model={"actor": ref})
    assert cached_roles(rlhfjob) == set()
    assert list(claims(rlhfjob)) == ["tiny-grpo-checkpoints"]


def test_the_shared_claim_is_owned_by_the_job_and_sized_for_each_distinct_hub_model_once() -> None:
    # Actor 8B, critic and reward model the same 8B RM: 2 × 8e9 × 2 × 1.5 B = 44.7 GiB.
    claim = claims(job("llama3-8b-ppo-rm.yaml"))["llama3-8b-ppo-models"]
    assert claim["spec"] == {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "45Gi"}},
                             "storageClassName": "fast-rwx"}  # the checkpoint volume's RWX class
    assert claim["metadata"]["ownerReferences"][0] | {"kind": "RLHFJob", "uid": UID} \
        == claim["metadata"]["ownerReferences"][0]
    volumes = [cache_of(pod) for pod in templates(job("llama3-8b-ppo-rm.yaml")).values()]
    assert {v["persistentVolumeClaim"]["claimName"] for v in volumes if v} == {"llama3-8b-ppo-models"}


@pytest.mark.parametrize(("model", "size"), [
    ({"actor": "Qwen/Qwen2.5-72B-Instruct"}, "202Gi"),  # 72e9 × 3 B = 201.2 GiB
    ({"actor": "acme/policy", "size": "7B"}, "20Gi"),  # model.size when the name says nothing: 19.6 GiB
    ({"actor": "acme/policy-7B", "tokenizer": "acme/tokenizer"}, "21Gi"),  # + 1 GiB of tokenizer files
])
def test_the_shared_claim_is_sized_from_the_parameter_count(model: dict[str, str], size: str) -> None:
    claim = claims(job(model=model))["tiny-grpo-models"]
    assert claim["spec"]["resources"]["requests"]["storage"] == size
    assert "storageClassName" not in claim["spec"]


def test_an_explicit_size_and_storage_class_are_used_as_given() -> None:
    rlhfjob = job("llama3-8b-ppo-rm.yaml", modelCache={"size": "300Gi", "storageClassName": "nfs"})
    claim = claims(rlhfjob)["llama3-8b-ppo-models"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "300Gi"
    assert claim["spec"]["storageClassName"] == "nfs"


def test_a_named_claim_is_mounted_and_none_is_created() -> None:
    rlhfjob = job("llama3-8b-ppo-rm.yaml", modelCache={"claimName": "team-models"})
    assert list(claims(rlhfjob)) == ["llama3-8b-ppo-checkpoints"]
    volumes = [cache_of(pod) for pod in templates(rlhfjob).values()]
    assert {v["persistentVolumeClaim"]["claimName"] for v in volumes if v} == {"team-models"}


def test_per_pod_volumes_are_sized_for_each_pods_own_models_and_the_head_gets_none() -> None:
    rlhfjob = job(model={"actor": "Qwen/Qwen2.5-7B"}, reward={"model": "acme/rm-1.5B"},
                  modelCache={"volume": "perPod", "storageClassName": "local-nvme"})
    volumes = {role: cache_of(pod) for role, pod in templates(rlhfjob).items()}
    sizes = {role: v["ephemeral"]["volumeClaimTemplate"]["spec"]["resources"]["requests"]["storage"]
             for role, v in volumes.items() if v}
    # 7e9 × 3 B = 19.6 GiB; 1.5e9 × 3 B = 4.2 GiB. The head's tokenizer files sit in its scratch space.
    assert sizes == {"rollout": "20Gi", "actor": "20Gi", "reward": "5Gi"}
    assert volumes["actor"]["ephemeral"]["volumeClaimTemplate"]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert volumes["actor"]["ephemeral"]["volumeClaimTemplate"]["spec"]["storageClassName"] == "local-nvme"
    assert list(claims(rlhfjob)) == ["tiny-grpo-checkpoints"]


@pytest.mark.parametrize(("spec", "problem"), [
    ({"model": {"actor": "acme/policy-7B"}, "modelCache": {"volume": "perPod", "claimName": "team-models"}},
     "spec.modelCache.claimName: perPod volumes are new for each pod; remove claimName or set "
     "modelCache.volume: shared"),
    ({"model": {"actor": "acme/policy-7B"}, "modelCache": {"size": "200GB"}},
     "spec.modelCache.size: '200GB' is not a Kubernetes quantity (for example '200Gi')"),
])
def test_a_cache_that_cannot_be_built_is_a_spec_error_naming_the_fix(spec: dict[str, Any],
                                                                      problem: str) -> None:
    rlhfjob = job(**spec)
    with pytest.raises(api.SpecError) as refused:
        builders.build_all(rlhfjob, "team-a")
    assert refused.value.problems == [problem]


def test_a_model_of_unknown_size_gets_a_stated_guess_unless_the_size_or_a_claim_is_given() -> None:
    guessed = claims(job(model={"actor": "acme/policy"}))["tiny-grpo-models"]
    assert guessed["spec"]["resources"]["requests"]["storage"] == "40Gi"
    assert claims(job(model={"actor": "acme/policy"}, modelCache={"size": "80Gi"}))["tiny-grpo-models"]
    assert cached_roles(job(model={"actor": "acme/policy"}, modelCache={"claimName": "team-models"}))


def test_a_checkpoint_path_over_the_model_cache_is_refused() -> None:
    with pytest.raises(api.SpecError, match=r"spec\.checkpoint\.path: .* overlaps /var/cache/huggingface"):
        builders.build_all(job(checkpoint={"path": "/var/cache"}), "team-a")


def test_every_ray_pod_requests_scratch_disk_without_a_limit_and_the_submitter_none() -> None:
    for role, pod in templates(job("llama3-8b-ppo-rm.yaml")).items():
        [container] = pod["containers"]
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        assert requests.get("ephemeral-storage") == (None if role == "submitter" else "10Gi"), role
        assert "ephemeral-storage" not in limits
        if role != "submitter":  # Guaranteed QoS: the limits still equal the cpu / memory / GPU requests
            assert limits == {k: v for k, v in requests.items() if k != "ephemeral-storage"}


@pytest.mark.parametrize("cache", [{}, {"volume": "perPod"}, {"claimName": "team-models"},
                                   {"volume": "perPod", "size": "100Gi", "storageClassName": "nvme"}])
@pytest.mark.parametrize("version", ["1.29", "1.34"])
def test_rendered_caches_validate_strictly(cache: dict[str, str], version: str) -> None:
    rlhfjob = job("llama3-8b-ppo-rm.yaml", modelCache=cache, reference={"colocateWithActor": False})
    objects = builders.build_all(rlhfjob, "team-a")
    rayjob = objects[-1]
    assert validate_kuberay(rayjob) == []
    pods = [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": role}, "template": {"spec": pod}}
            for role, pod in templates(rlhfjob).items()]
    for obj in objects[:-1] + pods:
        assert validate_builtin(obj, version) == [], obj["kind"]
