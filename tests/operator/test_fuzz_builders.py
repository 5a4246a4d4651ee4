"""The builders never crash on a valid spec, and what they build is what Kubernetes and KubeRay accept.

Valid specs are generated across algorithms, placements, GPUs, replicas, engines and every
optional block, respecting the API's cross-field rules by construction (and `parse_job` has the
final word). Each rendering is checked strictly: the RayJob against the real KubeRay v1.7.0 CRD
schema, every built-in object with kubernetes-validate. Schema checks are slow, so the example
count is modest.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kuberlhf import api
from kuberlhf_operator import builders
from tests.kuberay_schema import validate_builtin, validate_kuberay

CPUS = ["1", "2", "500m", "2.5", "16", "96"]
MEMORIES = ["512Mi", "8Gi", "1.5Gi", "100G", "2Ti", "64Gi"]
dns_names = st.from_regex(r"[a-z]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True)
label_values = st.from_regex(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,20}[A-Za-z0-9])?", fullmatch=True)
secret_refs = st.builds(lambda n, k: {"name": n, "key": k}, dns_names, st.sampled_from(["token", "hf-token"]))


def resources(draw: st.DrawFn, gpus: int) -> dict[str, Any]:
    return {"gpus": gpus, "cpu": draw(st.sampled_from(CPUS)), "memory": draw(st.sampled_from(MEMORIES))}


def optional(draw: st.DrawFn, strategy: st.SearchStrategy[Any]) -> Any:
    return draw(st.one_of(st.none(), strategy))


@st.composite
def valid_documents(draw: st.DrawFn) -> dict[str, Any]:
    algorithm = draw(st.sampled_from(["ppo", *api.GROUP_ALGORITHMS, "reinforce_pp"]))
    placement = draw(st.sampled_from(["separate", "colocate"]))
    engine = draw(st.sampled_from(["hf", "vllm"]))
    gpus = draw(st.integers(0, 8))
    tensor_parallel = gpus if engine == "vllm" and gpus > 1 and draw(st.booleans()) else 1
    actor_replicas = draw(st.integers(1, 64))
    rollout_replicas = actor_replicas if placement == "colocate" else draw(st.integers(1, 16))
    micro = draw(st.integers(1, 8))
    kl = draw(st.sampled_from([0.0, 0.001, 0.05]))
    reward_kind = draw(st.sampled_from(["function", "model", "url"]))
    rewards: dict[str, dict[str, Any]] = {
        "function": {"function": "my_rewards:score"},
        "model": {"model": draw(st.sampled_from(["pvc://models/rm", "OpenRLHF/Llama-3-8b-rm-700k"])),
                  "replicas": draw(st.integers(1, 4)),
                  "resources": resources(draw, draw(st.integers(0, 2)))},
        "url": {"url": "http://rm.example:8000", "timeoutSeconds": draw(st.floats(0.5, 300))},
    }
    reward = rewards[reward_kind]
    if draw(st.booleans()):
        reward["tokenSecretRef"] = draw(secret_refs)
    model: dict[str, Any] = {"actor": draw(st.sampled_from(["builtin:tiny", "Qwen/Qwen2.5-7B", "s3://b/m"]))}
    if kl > 0 and draw(st.booleans()):
        model["reference"] = "pvc://models/ref"
    if algorithm == "ppo" and draw(st.booleans()):
        model["critic"] = "pvc://models/critic"
    if draw(st.booleans()):
        model["hubTokenSecretRef"] = draw(secret_refs)
    spec: dict[str, Any] = {
        "algorithm": algorithm,
        "model": model,
        "reward": reward,
        "placement": placement,
        "rollout": {"engine": engine, "replicas": rollout_replicas, "resources": resources(draw, gpus),
                    "tensorParallelSize": tensor_parallel,
                    "samplesPerPrompt": draw(st.integers(2 if algorithm in api.GROUP_ALGORITHMS else 1, 16))},
        "actor": {"replicas": actor_replicas, "resources": resources(draw, gpus),
                  "zeroStage": draw(st.integers(0, 3)), "offloadOptimizer": draw(st.booleans()),
                  "microBatchSize": micro,
                  "globalBatchSize": micro * actor_replicas * max(gpus, 1) * draw(st.integers(1, 4))},
        "reference": {"colocateWithActor": draw(st.booleans()), "replicas": draw(st.integers(1, 4)),
                      "resources": resources(draw, draw(st.integers(0, 2)))},
        "kl": {"coef": kl},
        "checkpoint": {"path": draw(st.sampled_from(["/checkpoints", "ckpt", "/mnt/a/../b", "/tmp/ckpt"])),
                       "volume": draw(st.sampled_from([{}, {"claimName": "shared-ckpt"},
                                                       {"size": "1Ti", "storageClassName": "fast-rwx"}]))},
        "modelCache": draw(st.sampled_from([
            {}, {"volume": "perPod"}, {"claimName": "team-models"},
            {"size": "300Gi", "storageClassName": "nfs"},
            {"volume": "perPod", "size": "80Gi", "storageClassName": "nvme"}])),
        "suspend": draw(st.booleans()),
        "backoffLimit": draw(st.integers(0, 100)),
        "ttlSecondsAfterFinished": draw(st.sampled_from([0, 600, 2**31 - 1])),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }
    if algorithm == "ppo" and draw(st.booleans()):
        spec["critic"] = {"replicas": draw(st.integers(1, 8)),
                          "resources": resources(draw, draw(st.integers(0, 2)))}
    if draw(st.booleans()):
        spec["nodeSelector"] = draw(st.dictionaries(
            st.sampled_from(["nvidia.com/gpu.product", "pool", "topology.kubernetes.io/zone"]), label_values,
            max_size=3))
    if draw(st.booleans()):
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                               {"key": "spot", "operator": "Equal", "value": "true", "effect": "NoExecute",
                                "tolerationSeconds": draw(st.integers(0, 2**40))}]
    if draw(st.booleans()):
        spec["priorityClassName"] = draw(dns_names)
    if draw(st.booleans()):
        spec["queueName"] = draw(dns_names)
    namespace = optional(draw, dns_names)
    return {"apiVersion": api.API_VERSION, "kind": api.KIND,
            "metadata": {"name": draw(dns_names), **({"namespace": namespace} if namespace else {}),
                         **({"uid": "0b1e2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"} if draw(st.booleans()) else {})},
            "spec": spec}


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_documents(), dns_names)
def test_every_valid_spec_renders_objects_the_api_server_and_kuberay_accept(doc: dict[str, Any],
                                                                            namespace: str) -> None:
    job = api.parse_job(doc)
    objects = builders.build_all(job, namespace)
    kinds = [o["kind"] for o in objects]
    assert kinds[-1] == "RayJob" and kinds.count("RayJob") == 1
    claims = {o["metadata"]["name"] for o in objects if o["kind"] == "PersistentVolumeClaim"}
    assert (f"{job.metadata.name}-checkpoints" in claims) == (job.spec.checkpoint.volume.claim_name is None)
    cache = job.spec.model_cache
    assert claims <= {f"{job.metadata.name}-checkpoints", f"{job.metadata.name}-models"}
    if cache.volume == "perPod" or cache.claim_name is not None:
        assert f"{job.metadata.name}-models" not in claims
    for obj in objects:
        assert obj["metadata"]["namespace"] == namespace
        problems = validate_kuberay(obj) if obj["kind"] == "RayJob" else validate_builtin(obj)
        assert problems == [], f"{obj['kind']}: {problems}"
    cluster = objects[-1]["spec"]["rayClusterSpec"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert ("critic" in groups) == (job.spec.algorithm == "ppo")
    assert ("reward" in groups) == (job.spec.reward.model is not None)


BASE: dict[str, Any] = {
    "apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "q"},
    "spec": {"algorithm": "ppo", "model": {"actor": "m", "size": "1B"}, "reward": {"model": "rm-1B"},
             "critic": {}},
}


@pytest.mark.unit
@pytest.mark.parametrize(("path", "value", "field"), [
    (("actor", "resources", "cpu"), "lots", "spec.actor.resources.cpu"),
    (("actor", "resources", "memory"), "8GB", "spec.actor.resources.memory"),
    (("rollout", "resources", "memory"), "eight", "spec.rollout.resources.memory"),
    (("critic", "resources", "cpu"), "1.2.3", "spec.critic.resources.cpu"),
    (("reward", "resources", "cpu"), "-1", "spec.reward.resources.cpu"),
    (("checkpoint", "volume", "size"), "big", "spec.checkpoint.volume.size"),
])
def test_a_malformed_quantity_is_a_spec_error_naming_its_field(path: tuple[str, ...], value: str,
                                                               field: str) -> None:
    doc = copy.deepcopy(BASE)
    node = doc["spec"]
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value
    job = api.parse_job(doc)
    with pytest.raises(api.SpecError) as raised:
        builders.build_all(job, "ns")
    assert [p for p in raised.value.problems if p.startswith(f"{field}: ")], raised.value.problems
    assert repr(value) in " ".join(raised.value.problems)


@pytest.mark.unit
@pytest.mark.parametrize(("path", "reason"), [
    ("/", "whole filesystem"), ("", "whole filesystem"), ("..", "whole filesystem"),
    ("/etc/kuberlhf", "/etc/kuberlhf"), ("/etc", "/etc/kuberlhf"), ("/etc/kuberlhf/ckpt", "/etc/kuberlhf"),
    ("/dev/shm", "/dev/shm"), ("dev", "/dev/shm"), ("/tmp", "/tmp/ray"),
])
def test_a_checkpoint_path_that_would_break_the_pods_is_a_spec_error(path: str, reason: str) -> None:
    doc = copy.deepcopy(BASE)
    doc["spec"]["checkpoint"] = {"path": path}
    job = api.parse_job(doc)
    for build in (builders.build_all, builders.build_rayjob):
        with pytest.raises(api.SpecError) as raised:
            build(job, "ns")
        [problem] = raised.value.problems
        assert problem.startswith("spec.checkpoint.path: ")
        assert reason in problem and "/checkpoints" in problem, "names the clash and a fix"


@pytest.mark.unit
@pytest.mark.parametrize("path", ["/checkpoints", "ckpt", "/tmp/checkpoints", "/data/etc", "/dev/shmem"])
def test_a_checkpoint_path_beside_the_reserved_folders_is_mounted_as_given(path: str) -> None:
    doc = copy.deepcopy(BASE)
    doc["spec"]["checkpoint"] = {"path": path}
    rayjob = builders.build_rayjob(api.parse_job(doc), "ns")
    [head] = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    mounts = head["volumeMounts"]
    assert {"name": "checkpoints", "mountPath": "/" + path.lstrip("/")} in mounts


# --- secrets ------------------------------------------------------------------------------------

FAKE_HUB_TOKEN = "hf_FAKE-hub-token-3f9a7c"
FAKE_REWARD_TOKEN = "rm-FAKE-bearer-token-81d2e4"


def strings(node: Any) -> list[str]:
    """Every key and string value in a rendered object, however deep."""
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (str(k), *strings(v))]
    if isinstance(node, list):
        return [s for item in node for s in strings(item)]
    return [node] if isinstance(node, str) else []


@pytest.mark.unit
def test_rendered_objects_carry_secret_references_never_secret_values() -> None:
    """The user's Secret holds the values; the builders see only {name, key} and must pass only that on."""
    user_secrets = [
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hub", "namespace": "ns"},
         "stringData": {"token": FAKE_HUB_TOKEN}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "rm-auth", "namespace": "ns"},
         "stringData": {"bearer": FAKE_REWARD_TOKEN}},
    ]
    assert all(validate_builtin(s) == [] for s in user_secrets)
    doc = copy.deepcopy(BASE)
    doc["spec"]["model"]["hubTokenSecretRef"] = {"name": "hub", "key": "token"}
    doc["spec"]["reward"] = {"url": "https://rm.example/score",
                             "tokenSecretRef": {"name": "rm-auth", "key": "bearer"}}
    objects = builders.build_all(api.parse_job(doc), "ns")

    rendered = [s for obj in objects for s in strings(obj)]
    assert not [s for s in rendered if FAKE_HUB_TOKEN in s or FAKE_REWARD_TOKEN in s]
    assert "Secret" not in [o["kind"] for o in objects]

    rayjob = objects[-1]
    cluster = rayjob["spec"]["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]
    expected = {"HF_TOKEN": {"name": "hub", "key": "token"},
                "KUBERLHF_REWARD_TOKEN": {"name": "rm-auth", "key": "bearer"}}
    for template in templates:
        env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
        for name, ref in expected.items():
            assert env[name] == {"name": name, "valueFrom": {"secretKeyRef": ref}}
    submitter = rayjob["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    assert "env" not in submitter, "the submitter needs no secret"

    [configmap] = [o for o in objects if o["kind"] == "ConfigMap"]
    spec = yaml.safe_load(next(iter(configmap["data"].values())))["spec"]
    assert spec["model"]["hubTokenSecretRef"] == {"name": "hub", "key": "token"}
    assert spec["reward"]["tokenSecretRef"] == {"name": "rm-auth", "key": "bearer"}
