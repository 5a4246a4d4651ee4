"""The operator's pure builders: RLHFJob → ServiceAccount, Role, RoleBinding, PVC, ConfigMap, RayJob."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from kuberlhf import api
from kuberlhf.topology import worker_groups
from kuberlhf_operator import builders
from kuberlhf_operator.quantities import parse_quantity, shm_size

pytestmark = pytest.mark.unit

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
COMMON_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/managed-by", "app.kubernetes.io/instance",
                 "kuberlhf.io/job")
UID = "6f1c0b1e-1111-4a4a-9c9c-0123456789ab"


def example(name: str) -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())


def job_of(doc: dict[str, Any]) -> api.RLHFJob:
    return api.parse_job(doc)


def with_spec(doc: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    out["spec"].update(changes)
    return out


def rayjob(doc: dict[str, Any], namespace: str = "team-a") -> dict[str, Any]:
    return builders.build_rayjob(job_of(doc), namespace)


def groups_by_name(rj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {g["groupName"]: g for g in rj["spec"]["rayClusterSpec"]["workerGroupSpecs"]}


def pod_templates(rj: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = rj["spec"]["rayClusterSpec"]
    return [
        cluster["headGroupSpec"]["template"],
        *(g["template"] for g in cluster["workerGroupSpecs"]),
        rj["spec"]["submitterPodTemplate"],
    ]


def ray_containers(rj: dict[str, Any]) -> list[dict[str, Any]]:
    return [t["spec"]["containers"][0] for t in pod_templates(rj)[:-1]]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container["env"]}


# role -> (replicas, GPUs per replica); absent roles must have no group.
EXPECTED_GROUPS = {
    "tiny-grpo": {"rollout": (1, 0), "actor": (1, 0)},
    "tiny-ppo": {"rollout": (1, 0), "actor": (1, 0), "critic": (1, 0)},
    "llama3-8b-ppo-rm": {"rollout": (4, 1), "actor": (4, 1), "critic": (2, 1), "reward": (2, 1)},
    "qwen2.5-72b-grpo-colocate": {"actor": (4, 8)},  # 4 pods x 8 GPUs: 32 ranks
}


@pytest.mark.parametrize("name", sorted(EXPECTED_GROUPS))
def test_worker_groups_have_the_replicas_and_gpus_of_each_role(name: str) -> None:
    groups = groups_by_name(rayjob(example(name)))
    assert set(groups) == set(EXPECTED_GROUPS[name])
    for role, (replicas, gpus) in EXPECTED_GROUPS[name].items():
        group = groups[role]
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == replicas
        resources = group["template"]["spec"]["containers"][0]["resources"]
        for side in ("requests", "limits"):
            if gpus:
                assert resources[side]["nvidia.com/gpu"] == str(gpus)
            else:
                assert "nvidia.com/gpu" not in resources[side]


def test_the_rm_example_runs_four_rollout_gpus_and_reward_servers_on_their_own_group() -> None:
    groups = groups_by_name(rayjob(example("llama3-8b-ppo-rm")))
    rollout_gpus = groups["rollout"]["replicas"] * int(
        groups["rollout"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    )
    assert rollout_gpus == 4
    assert groups["reward"]["resources"] == {"kuberlhf.io/reward": "1"}


def test_colocated_example_shares_actor_gpus_between_actor_and_rollout() -> None:
    groups = groups_by_name(rayjob(example("qwen2.5-72b-grpo-colocate")))
    assert "rollout" not in groups and "reference" not in groups
    # One unit per GPU: one placement bundle each, which a trainer rank and a vLLM worker share.
    assert groups["actor"]["resources"] == {"kuberlhf.io/actor": "8"}


@pytest.mark.parametrize("name", sorted(EXPECTED_GROUPS))
def test_group_ray_resources_are_the_topologys_custom_resources_as_strings(name: str) -> None:
    job = job_of(example(name))
    groups = groups_by_name(builders.build_rayjob(job, "ns"))
    for group in worker_groups(job.spec):
        typed = groups[group.role]["resources"]
        assert {k: float(v) for k, v in typed.items()} == group.ray_resources
        assert all(isinstance(v, str) for v in typed.values())
        assert "resources" not in groups[group.role].get("rayStartParams", {})


def test_fractional_ray_resources_keep_their_fraction() -> None:
    from kuberlhf_operator.builders import _quantity

    assert (_quantity(3.0), _quantity(0.5), _quantity(1.25)) == ("3", "0.5", "1.25")


def test_head_takes_no_ray_work_and_only_it_gets_an_api_token() -> None:
    rj = rayjob(example("tiny-ppo"))
    head = rj["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"] == {"dashboard-host": "0.0.0.0", "num-cpus": "0"}
    templates = pod_templates(rj)
    assert templates[0]["spec"]["automountServiceAccountToken"] is True
    assert all(t["spec"]["automountServiceAccountToken"] is False for t in templates[1:])
    assert {t["spec"]["serviceAccountName"] for t in templates} == {"tiny-ppo-driver"}


def test_rayjob_runs_the_driver_with_the_mounted_spec_and_resumable_output() -> None:
    rj = rayjob(example("llama3-8b-ppo-rm"))
    spec = rj["spec"]
    assert spec["entrypoint"] == (
        "kuberlhf run /etc/kuberlhf/rlhfjob.yaml --ray-address auto "
        "--output /checkpoints/llama3-8b-ppo --quiet"
    )
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] == 600
    assert spec["backoffLimit"] == 2
    assert spec["suspend"] is False
    assert spec["rayClusterSpec"]["rayVersion"] == "2.60.0"
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}


def test_lifecycle_fields_follow_the_spec() -> None:
    doc = with_spec(example("tiny-grpo"), backoffLimit=5, ttlSecondsAfterFinished=30, suspend=True)
    spec = rayjob(doc)["spec"]
    assert (spec["backoffLimit"], spec["ttlSecondsAfterFinished"], spec["suspend"]) == (5, 30, True)


def test_every_ray_pod_holds_its_termination_until_the_driver_has_saved() -> None:
    """KubeRay deletes every pod at once: each Ray pod's preStop waits for the driver's checkpoint on
    the shared volume, bounded by the pod's grace period less the margin for `ray stop`."""
    rj = rayjob(with_spec(example("tiny-grpo"), terminationGracePeriodSeconds=120))
    templates = pod_templates(rj)
    for template in templates[:-1]:
        assert template["spec"]["terminationGracePeriodSeconds"] == 120
        assert template["spec"]["containers"][0]["lifecycle"] == {"preStop": {"exec": {"command": [
            "kuberlhf", "wait-saved", "--output", "/checkpoints/tiny-grpo", "--timeout", "110"]}}}
    submitter = templates[-1]["spec"]
    assert "terminationGracePeriodSeconds" not in submitter and "lifecycle" not in submitter["containers"][0]


def test_the_grace_period_defaults_to_five_minutes_and_a_zero_one_waits_for_nothing() -> None:
    default = pod_templates(rayjob(example("tiny-grpo")))[0]["spec"]
    assert default["terminationGracePeriodSeconds"] == 300
    assert default["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][-1] == "290"
    zero = pod_templates(rayjob(with_spec(example("tiny-grpo"), terminationGracePeriodSeconds=0)))[1]["spec"]
    assert zero["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][-1] == "0"


def test_a_relative_checkpoint_path_is_rooted_in_the_pods() -> None:
    rj = rayjob(example("tiny-grpo"))
    assert "--output /checkpoints/tiny-grpo " in rj["spec"]["entrypoint"]
    doc = with_spec(example("tiny-grpo"), checkpoint={"path": "/mnt/ckpt"})
    rj = rayjob(doc)
    assert "--output /mnt/ckpt/tiny-grpo " in rj["spec"]["entrypoint"]
    for container in ray_containers(rj):
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["checkpoints"] == "/mnt/ckpt"


def test_queued_job_is_created_suspended_with_the_kueue_label() -> None:
    rj = rayjob(example("qwen2.5-72b-grpo-colocate"))
    assert rj["spec"]["suspend"] is True
    assert rj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "research-gpus"
    unqueued = rayjob(example("tiny-grpo"))
    assert "kueue.x-k8s.io/queue-name" not in unqueued["metadata"]["labels"]


def test_every_pod_gets_the_scheduling_constraints() -> None:
    rj = rayjob(example("llama3-8b-ppo-rm"))
    for template in pod_templates(rj):
        spec = template["spec"]
        assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        assert spec["tolerations"] == [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
        assert spec["priorityClassName"] == "training-high"
    plain = rayjob(example("tiny-grpo"))
    for template in pod_templates(plain):
        assert not {"nodeSelector", "tolerations", "priorityClassName"} & set(template["spec"])


def test_every_pod_runs_non_root_without_capabilities() -> None:
    for template in pod_templates(rayjob(example("llama3-8b-ppo-rm"))):
        pod = template["spec"]["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 1000
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in template["spec"]["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}


def test_ray_pods_mount_spec_checkpoints_and_a_memory_backed_shm() -> None:
    rj = rayjob(example("llama3-8b-ppo-rm"))
    for template in pod_templates(rj)[:-1]:
        container = template["spec"]["containers"][0]
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["spec"] == {"name": "spec", "mountPath": "/etc/kuberlhf", "readOnly": True}
        assert volumes["spec"]["configMap"]["name"] == "llama3-8b-ppo-spec"
        assert mounts["checkpoints"]["mountPath"] == "/checkpoints"
        assert volumes["checkpoints"]["persistentVolumeClaim"]["claimName"] == "llama3-8b-ppo-checkpoints"
        assert mounts["dshm"]["mountPath"] == "/dev/shm"
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
        memory = parse_quantity(container["resources"]["limits"]["memory"])
        assert parse_quantity(volumes["dshm"]["emptyDir"]["sizeLimit"]) == memory / 4


def test_every_ray_pod_knows_its_job_namespace_and_role() -> None:
    rj = rayjob(example("llama3-8b-ppo-rm"), namespace="rlhf")
    roles = []
    for template in pod_templates(rj)[:-1]:
        env = env_of(template["spec"]["containers"][0])
        assert env["KUBERLHF_JOB_NAME"]["value"] == "llama3-8b-ppo"
        assert env["KUBERLHF_NAMESPACE"]["value"] == "rlhf"
        assert env["RAY_USAGE_STATS_ENABLED"]["value"] == "0"
        assert template["metadata"]["labels"]["kuberlhf.io/role"] == env["KUBERLHF_ROLE"]["value"]
        roles.append(env["KUBERLHF_ROLE"]["value"])
    assert roles == ["head", "rollout", "actor", "critic", "reward"]


def _walk(node: Any, path: str = "") -> list[tuple[str, Any]]:
    if isinstance(node, dict):
        return [(path, node)] + [p for k, v in node.items() for p in _walk(v, f"{path}.{k}")]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _walk(v, f"{path}[{i}]")]
    return []


def test_secrets_reach_pods_only_as_secret_key_refs() -> None:
    doc = example("llama3-8b-ppo-rm")
    doc["spec"]["reward"] = {"url": "https://rm.example/score", "tokenSecretRef": {"name": "rm-auth",
                                                                                 "key": "bearer"}}
    rj = rayjob(doc)
    for container in ray_containers(rj):
        env = env_of(container)
        assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
        reward_ref = {"secretKeyRef": {"name": "rm-auth", "key": "bearer"}}
        assert env["KUBERLHF_REWARD_TOKEN"]["valueFrom"] == reward_ref
        assert "value" not in env["HF_TOKEN"] and "value" not in env["KUBERLHF_REWARD_TOKEN"]
    # Anywhere a Secret is named in the RayJob, it is inside a secretKeyRef.
    refs = [(p, n) for p, n in _walk(rj) if n.get("name") in ("hf-token", "rm-auth")]
    assert refs and all(p.endswith(".secretKeyRef") for p, _ in refs)
    plain = rayjob(example("tiny-grpo"))
    assert all(not {"HF_TOKEN", "KUBERLHF_REWARD_TOKEN"} & set(env_of(c)) for c in ray_containers(plain))


def test_driver_rbac_pins_its_own_job_and_has_no_wildcards() -> None:
    sa, role, binding = builders.build_driver_rbac(job_of(example("tiny-ppo")), "team-a")
    assert (sa["kind"], role["kind"], binding["kind"]) == ("ServiceAccount", "Role", "RoleBinding")
    granted = {}
    for rule in role["rules"]:
        assert "*" not in yaml.safe_dump(rule)
        assert rule["apiGroups"] == ["kuberlhf.io"]
        assert rule["resourceNames"] == ["tiny-ppo"]
        for resource in rule["resources"]:
            granted[resource] = sorted(rule["verbs"])
    assert granted == {"rlhfjobs/status": ["patch"]}
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "team-a"}
    ]


def test_build_all_returns_every_child_in_apply_order() -> None:
    objects = builders.build_all(job_of(example("tiny-ppo")), "team-a")
    assert [o["kind"] for o in objects] == [
        "ServiceAccount", "Role", "RoleBinding", "PersistentVolumeClaim", "ConfigMap", "PodDisruptionBudget",
        "NetworkPolicy", "RayJob",
    ]
    names = builders.child_names(job_of(example("tiny-ppo")))
    assert [o["metadata"]["name"] for o in objects] == [
        names.service_account, names.role, names.role_binding, names.pvc, names.configmap,
        names.pod_disruption_budget, names.network_policy, names.rayjob,
    ]
    assert {o["metadata"]["namespace"] for o in objects} == {"team-a"}


def test_an_existing_claim_replaces_the_created_pvc() -> None:
    doc = with_spec(example("tiny-ppo"), checkpoint={"volume": {"claimName": "shared-ckpt"}})
    job = job_of(doc)
    assert builders.build_pvc(job, "ns") is None
    objects = builders.build_all(job, "ns")
    assert "PersistentVolumeClaim" not in [o["kind"] for o in objects]
    for template in pod_templates(objects[-1])[:-1]:
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes["checkpoints"]["persistentVolumeClaim"]["claimName"] == "shared-ckpt"


def test_created_pvc_is_shared_by_all_nodes_and_sized_from_the_spec() -> None:
    pvc = builders.build_pvc(job_of(example("llama3-8b-ppo-rm")), "rlhf")
    assert pvc is not None
    assert pvc["spec"] == {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": "500Gi"}},
        "storageClassName": "fast-rwx",
    }


def test_configmap_holds_the_full_spec_that_parses_back_to_the_same_job() -> None:
    job = job_of(example("llama3-8b-ppo-rm"))
    cm = builders.build_configmap(job, "team-a")
    assert list(cm["data"]) == ["rlhfjob.yaml"]
    reread = api.parse_job(yaml.safe_load(cm["data"]["rlhfjob.yaml"]))
    assert reread.spec == job.spec
    assert (reread.metadata.name, reread.metadata.namespace) == ("llama3-8b-ppo", "team-a")
    assert reread.status is None


def test_every_object_carries_the_common_labels() -> None:
    for obj in builders.build_all(job_of(example("tiny-ppo")), "ns"):
        labels = obj["metadata"]["labels"]
        assert {k: labels[k] for k in COMMON_LABELS} == {
            "app.kubernetes.io/name": "kuberlhf",
            "app.kubernetes.io/managed-by": "kuberlhf-operator",
            "app.kubernetes.io/instance": "tiny-ppo",
            "kuberlhf.io/job": "tiny-ppo",
        }
        if obj["kind"] == "RayJob":
            for template in pod_templates(obj):
                assert set(COMMON_LABELS) | {"kuberlhf.io/role"} <= set(template["metadata"]["labels"])


def test_owner_references_point_at_the_job_when_its_uid_is_known() -> None:
    doc = example("tiny-ppo")
    doc["metadata"]["uid"] = UID
    job = job_of(doc)
    expected = {"apiVersion": "kuberlhf.io/v1alpha1", "kind": "RLHFJob", "name": "tiny-ppo", "uid": UID,
                "controller": True, "blockOwnerDeletion": True}
    assert builders.owner_reference(job) == expected
    for obj in builders.build_all(job, "ns"):
        assert obj["metadata"]["ownerReferences"] == [expected]


def test_a_dry_run_without_uid_has_no_owner_references() -> None:
    job = job_of(example("tiny-ppo"))
    assert all("ownerReferences" not in o["metadata"] for o in builders.build_all(job, "ns"))
    with pytest.raises(ValueError, match="uid"):
        builders.owner_reference(job)


def test_child_names_are_stable_and_fit_kubernetes_and_kuberay_limits() -> None:
    long_name = "a" * (api.MAX_NAME_LENGTH - 1) + "z"
    doc = example("tiny-grpo")
    doc["metadata"]["name"] = long_name
    names = builders.child_names(job_of(doc))
    other = builders.child_names(job_of(with_spec(doc, seed=7, suspend=True)))
    assert names == other
    assert names.rayjob == f"{long_name}-ray"
    values = [names.configmap, names.rayjob, names.service_account, names.role, names.role_binding, names.pvc]
    assert all(v.startswith(f"{long_name}-") and len(v) <= 63 for v in values)
    # KubeRay appends 6 characters to a RayJob's name for its RayCluster and caps RayJobs at 47.
    assert len(names.rayjob) <= 47
    assert len({names.configmap, names.rayjob, names.service_account, names.pvc}) == 4


@pytest.mark.parametrize(
    ("group", "field"),
    [("actor", "spec.actor.resources.memory"), ("rollout", "spec.rollout.resources.memory"),
     ("reward", "spec.reward.resources.memory")],
)
def test_a_malformed_memory_quantity_names_the_field(group: str, field: str) -> None:
    doc = example("llama3-8b-ppo-rm")
    doc["spec"][group]["resources"]["memory"] = "64GB"
    job = job_of(doc)
    with pytest.raises(api.SpecError) as caught:
        builders.build_all(job, "ns")
    assert caught.value.problems == [f"{field}: '64GB' is not a Kubernetes quantity (for example '64Gi')"]


def test_a_critic_without_its_own_section_is_checked_under_the_actor() -> None:
    doc = example("tiny-ppo")
    del doc["spec"]["critic"]
    doc["spec"]["actor"]["resources"] = {"cpu": "two"}
    with pytest.raises(api.SpecError) as caught:
        builders.build_rayjob(job_of(doc), "ns")
    assert caught.value.problems == [
        "spec.actor.resources.cpu: 'two' is not a Kubernetes quantity (for example '8 or 500m')"
    ]


def test_a_malformed_volume_size_names_the_field() -> None:
    doc = with_spec(example("tiny-grpo"), checkpoint={"volume": {"size": "1 TB"}})
    with pytest.raises(api.SpecError, match=r"spec\.checkpoint\.volume\.size: '1 TB'"):
        builders.build_pvc(job_of(doc), "ns")


@pytest.mark.parametrize(
    ("text", "value"),
    [("8Gi", 8 * 2**30), ("500m", 0.5), ("2", 2), ("1.5G", 1.5e9), ("1e3", 1000), ("64Mi", 64 * 2**20)],
)
def test_parse_quantity_understands_kubernetes_suffixes(text: str, value: float) -> None:
    assert float(parse_quantity(text)) == pytest.approx(value)


@pytest.mark.parametrize("text", ["8GB", "", "Gi", "1.2.3", "-1Gi", "8 Gi"])
def test_parse_quantity_rejects_what_kubernetes_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        parse_quantity(text)


def test_shm_is_a_quarter_of_memory_in_mebibytes() -> None:
    assert (shm_size("8Gi"), shm_size("64Gi"), shm_size("1Mi")) == ("2048Mi", "16384Mi", "1Mi")
