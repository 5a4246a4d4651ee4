"""RLHFJob → the Kubernetes objects the operator owns: pure functions, no API calls.

The operator applies what `build_all` returns, in order, and `kuberlhf render` prints the
same list, so what a user previews is exactly what the cluster gets. Each builder raises
kuberlhf.api.SpecError (naming the field and the fix) for values only Kubernetes would
reject, such as a malformed memory quantity.

The Ray side: one KubeRay RayJob whose RayCluster has a head (it runs the driver, the
RayJob entrypoint, and takes no Ray work: num-cpus 0) and one worker group per
`kuberlhf.topology.worker_groups` entry. Each group advertises its role's Ray custom resource
through KubeRay's typed `resources` map, and the driver asks for the same resources, so its
actors land on the pods meant for them. The reward group (model rewards) is a plain Ray
worker group too: the driver's reward actors are placed there, one per GPU, each scoring its
share of a step with the reward model, so the pods need no command of their own.
"""

from __future__ import annotations

import shlex
from typing import Any

import yaml

from kuberlhf.api import API_VERSION, KIND, RLHFJob, SpecError, spec_to_dict
from kuberlhf.jobrefs import ref_problems
from kuberlhf.placement import plan_for
from kuberlhf.topology import WorkerGroup, worker_groups
from kuberlhf_operator.disruption import build_pod_disruption_budget
from kuberlhf_operator.modelcache import build_model_cache_pvc, model_cache_problems
from kuberlhf_operator.names import (
    QUEUE_LABEL,
    ChildNames,
    child_names,
    object_meta,
    owner_reference,
)
from kuberlhf_operator.netpol import Peers, build_network_policy
from kuberlhf_operator.pods import (
    HEAD_RESOURCES,
    SPEC_KEY,
    SPEC_PATH,
    check_checkpoint_path,
    output_dir,
    ray_pod_template,
    submitter_pod_template,
)
from kuberlhf_operator.quantities import check_quantities
from kuberlhf_operator.rbac import build_driver_rbac

__all__ = [
    "ChildNames",
    "Peers",
    "build_all",
    "build_configmap",
    "build_driver_rbac",
    "build_model_cache_pvc",
    "build_network_policy",
    "build_pod_disruption_budget",
    "build_pvc",
    "build_rayjob",
    "child_names",
    "entrypoint",
    "owner_reference",
]

RAY_VERSION = "2.60.0"
RAYJOB_API_VERSION = "ray.io/v1"


def spec_document(job: RLHFJob, namespace: str) -> dict[str, Any]:
    """The RLHFJob the driver reads: defaults filled in, status and server-side metadata left out."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": job.metadata.name, "namespace": namespace},
        "spec": spec_to_dict(job.spec),
    }


def build_configmap(job: RLHFJob, namespace: str) -> dict[str, Any]:
    """The job spec, mounted read-only at /etc/kuberlhf in every Ray pod.

    Only the spec travels here. A reward function file ("file.py:fn") is resolved relative to
    the spec, so in a cluster it must already be in the worker image or on a mounted PVC; it
    is never copied into the ConfigMap (which is capped at 1 MiB and is not a code channel).
    """
    document = yaml.safe_dump(spec_document(job, namespace), sort_keys=False)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_meta(job, namespace, child_names(job).configmap),
        "data": {SPEC_KEY: document},
    }


def build_pvc(job: RLHFJob, namespace: str) -> dict[str, Any] | None:
    """The checkpoint volume, unless the spec names an existing claim.

    ReadWriteMany because every Ray pod mounts it (ZeRO-3 ranks on different nodes each write
    their shard); its storage class must support that.
    """
    volume = job.spec.checkpoint.volume
    if volume.claim_name is not None:
        return None
    check_quantities(job.spec)
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": volume.size}},
    }
    if volume.storage_class_name is not None:
        spec["storageClassName"] = volume.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": object_meta(job, namespace, child_names(job).pvc),
        "spec": spec,
    }


def entrypoint(job: RLHFJob) -> str:
    """The driver command, writing to `pods.output_dir` (the checkpoint volume)."""
    return shlex.join(
        ["kuberlhf", "run", SPEC_PATH, "--ray-address", "auto", "--output", output_dir(job), "--quiet"]
    )


def _quantity(amount: float) -> str:
    return str(int(amount)) if float(amount).is_integer() else repr(float(amount))


def _head_group(job: RLHFJob, namespace: str) -> dict[str, Any]:
    return {
        "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
        "template": ray_pod_template(job, namespace, "head", HEAD_RESOURCES, api_access=True),
    }


def _worker_group(job: RLHFJob, namespace: str, group: WorkerGroup) -> dict[str, Any]:
    """A fixed-size group: RLHF ranks are wired together at start, so autoscaling would break them."""
    return {
        "groupName": group.role,
        "replicas": group.replicas,
        "minReplicas": group.replicas,
        "maxReplicas": group.replicas,
        "resources": {name: _quantity(amount) for name, amount in group.ray_resources.items()},
        "template": ray_pod_template(job, namespace, group.role, group.resources, api_access=False),
    }


def ray_cluster_spec(job: RLHFJob, namespace: str) -> dict[str, Any]:
    """The RayCluster. Token auth (KubeRay generates the Secret and hands it to every Ray process)
    closes the dashboard and GCS to anyone else on the pod network."""
    return {
        "rayVersion": RAY_VERSION,
        "authOptions": {"mode": "token"},
        "headGroupSpec": _head_group(job, namespace),
        "workerGroupSpecs": [_worker_group(job, namespace, g) for g in worker_groups(job.spec)],
    }


def build_rayjob(job: RLHFJob, namespace: str) -> dict[str, Any]:
    """The RayJob that runs the driver on a fresh RayCluster and tears it down afterwards.

    With a Kueue queue the RayJob is created suspended and Kueue unsuspends it on admission:
    whoever updates an existing RayJob must not write spec.suspend back to true for a queued job.
    """
    check_quantities(job.spec)
    check_checkpoint_path(job)
    check_model_cache(job)
    spec = job.spec
    names = child_names(job)
    extra_labels = {QUEUE_LABEL: spec.queue_name} if spec.queue_name else {}
    return {
        "apiVersion": RAYJOB_API_VERSION,
        "kind": "RayJob",
        "metadata": object_meta(job, namespace, names.rayjob, extra_labels),
        "spec": {
            "entrypoint": entrypoint(job),
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": spec.ttl_seconds_after_finished,
            "backoffLimit": spec.backoff_limit,
            "suspend": spec.suspend or spec.queue_name is not None,
            "submitterPodTemplate": submitter_pod_template(job),
            "rayClusterSpec": ray_cluster_spec(job, namespace),
        },
    }


def check_plan(job: RLHFJob) -> None:
    """Refuse a job whose placement cannot work or does not fit its GPUs (`kuberlhf plan` shows why).
    The model's shape comes from its name or `model.size`: the operator has no model files."""
    problems = plan_for(job.spec).problems
    if problems:
        raise SpecError(problems)


def check_model_cache(job: RLHFJob) -> None:
    problems = model_cache_problems(job)
    if problems:
        raise SpecError(problems)


def build_all(job: RLHFJob, namespace: str, peers: Peers | None = None) -> list[dict[str, Any]]:
    """Every object the operator owns for one RLHFJob, in apply order: identity and RBAC first,
    then storage (checkpoints, the model cache) and the spec the pods mount, the disruption budget
    and the network policy before any pod exists, the RayJob last. `peers` says where the operators
    the network policy admits run (default: `Peers()`)."""
    check_quantities(job.spec)
    check_checkpoint_path(job)
    check_plan(job)
    check_model_cache(job)
    problems = ref_problems(job.spec, job.metadata.name)
    if problems:
        raise SpecError(problems)
    claims = [c for c in (build_pvc(job, namespace), build_model_cache_pvc(job, namespace)) if c is not None]
    return [
        *build_driver_rbac(job, namespace),
        *claims,
        build_configmap(job, namespace),
        build_pod_disruption_budget(job, namespace),
        build_network_policy(job, namespace, peers),
        build_rayjob(job, namespace),
    ]
