"""Pod templates for the RayJob: the head, one per worker group, and the job submitter.

Every pod runs the worker image as a non-root user with no capabilities, mounts the job
spec (ConfigMap) and the checkpoint volume, and gets secrets only as secretKeyRef, so no
secret value ever sits in a spec, a ConfigMap or the RLHFJob status.

Each Secret goes only to the containers whose processes use it (`hub_token_needed`,
`reward_token_needed`, `tracking_token_needed`): a Secret in a pod's environment is readable by
every process in it.
The model cache goes only to the Ray pods that fetch hub models (`modelcache.has_cache`).
"""

from __future__ import annotations

import posixpath
from typing import Any

from kuberlhf import shutdown
from kuberlhf.api import Resources, RLHFJob, SecretKeyRef, SpecError
from kuberlhf_operator.modelcache import (
    CACHE_DIR,
    VOLUME_NAME,
    cache_env,
    cache_volume,
    downloads_from_hub,
    has_cache,
)
from kuberlhf_operator.names import checkpoint_claim, child_names, pod_labels
from kuberlhf_operator.quantities import shm_size

SPEC_DIR = "/etc/kuberlhf"
SPEC_KEY = "rlhfjob.yaml"
SPEC_PATH = f"{SPEC_DIR}/{SPEC_KEY}"
SHM_DIR = "/dev/shm"
GPU_RESOURCE = "nvidia.com/gpu"
# The `ray` user of the Ray images; fsGroup makes the checkpoint volume writable for it.
RAY_UID = 1000
HEAD_RESOURCES = Resources(cpu="2", memory="8Gi")
# Node disk each Ray pod writes besides its volumes: Ray's session folder and logs, objects spilled
# from the object store, torch / DeepSpeed / vLLM kernel caches, builtin models built in place.
SCRATCH = "10Gi"
# Folders the checkpoint volume must neither cover nor sit inside: the pods' own mounts, and Ray's
# session folder (its unix sockets do not work on a shared network volume).
RESERVED_DIRS = {SPEC_DIR: "the job spec is mounted", SHM_DIR: "shared memory is mounted",
                 "/tmp/ray": "Ray keeps its session and sockets", CACHE_DIR: "the model cache is mounted"}


DEFAULT_CHECKPOINT_MOUNT = "/checkpoints"


def checkpoint_mount_path(job: RLHFJob) -> str:
    """Where the checkpoint volume is mounted in the pods; a relative spec path (fine locally) is
    taken from /."""
    path = job.spec.checkpoint.path
    return posixpath.normpath(posixpath.join("/", DEFAULT_CHECKPOINT_MOUNT if path is None else path))


def output_dir(job: RLHFJob) -> str:
    """The run's output folder in the pods: on the checkpoint volume, so a retried RayJob resumes from
    the newest checkpoint, and every Ray pod's preStop hook sees the driver's stop files."""
    return f"{checkpoint_mount_path(job)}/{job.metadata.name}"


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def checkpoint_path_problems(job: RLHFJob) -> list[str]:
    """Mount points Kubernetes would reject (a duplicate) or that would hide what the pods need."""
    path = checkpoint_mount_path(job)
    fix = "choose a folder of its own, such as /checkpoints"
    if path == "/":
        return [f"spec.checkpoint.path: {job.spec.checkpoint.path!r} mounts the volume over the whole "
                f"filesystem: {fix}"]
    return [f"spec.checkpoint.path: {job.spec.checkpoint.path!r} overlaps {reserved}, where {why}: {fix}"
            for reserved, why in RESERVED_DIRS.items() if _overlaps(path, reserved)]


def check_checkpoint_path(job: RLHFJob) -> None:
    problems = checkpoint_path_problems(job)
    if problems:
        raise SpecError(problems)


def pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RAY_UID,
        "runAsGroup": RAY_UID,
        "fsGroup": RAY_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    # readOnlyRootFilesystem stays false: Ray writes its session directory and logs under /tmp,
    # and torch / DeepSpeed / vLLM write JIT-compiled kernels and caches under the home folder;
    # the rest of the restricted Pod Security profile is met.
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": False,
    }


def _secret_env(name: str, ref: SecretKeyRef) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def hub_token_needed(job: RLHFJob, role: str) -> bool:
    """HF_TOKEN where models are downloaded: the head (the driver resolves the actor and tokenizer
    before any actor starts) and the rollout, trainer and reference pods; the reward pods only for a
    reward model from the hub, since nothing else there needs it."""
    if role == "reward":
        model = job.spec.reward.model if job.spec.reward is not None else None
        return model is not None and downloads_from_hub(model)
    return True


def reward_token_needed(job: RLHFJob, role: str) -> bool:
    """The reward-server token only for a `reward.url`, the one source that sends it. Its client runs in
    light reward actors that Ray may place on any Ray pod of the job (there is no reward group then),
    so every Ray pod gets it; a reward model scores in-process and never does."""
    return job.spec.reward is not None and job.spec.reward.url is not None


def tracking_token_needed(role: str) -> bool:
    """The MLflow token only on the head: the driver, which runs there, is the one process that
    talks to the tracking server (control/tracking.py)."""
    return role == "head"


def env(job: RLHFJob, namespace: str, role: str) -> list[dict[str, Any]]:
    """What every process needs to know about its job; secrets only as references, only where used."""
    out: list[dict[str, Any]] = [
        {"name": "KUBERLHF_JOB_NAME", "value": job.metadata.name},
        {"name": "KUBERLHF_NAMESPACE", "value": namespace},
        {"name": "KUBERLHF_ROLE", "value": role},
        {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"},
    ]
    hub = job.spec.model.hub_token_secret_ref
    reward = job.spec.reward.token_secret_ref if job.spec.reward is not None else None
    if hub is not None and hub_token_needed(job, role):
        out.append(_secret_env("HF_TOKEN", hub))
    if reward is not None and reward_token_needed(job, role):
        out.append(_secret_env("KUBERLHF_REWARD_TOKEN", reward))
    mlflow = job.spec.tracking.mlflow
    if mlflow is not None and mlflow.token_secret_ref is not None and tracking_token_needed(role):
        out.append(_secret_env("MLFLOW_TRACKING_TOKEN", mlflow.token_secret_ref))
    if has_cache(job, role):
        out += cache_env()
    return out


def volumes(job: RLHFJob, role: str, memory: str) -> list[dict[str, Any]]:
    return [
        {"name": "spec", "configMap": {"name": child_names(job).configmap}},
        {"name": "checkpoints", "persistentVolumeClaim": {"claimName": checkpoint_claim(job)}},
        # NCCL and vLLM exchange tensors through /dev/shm; the runtime's default is 64Mi.
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size(memory)}},
        *([cache_volume(job, role)] if has_cache(job, role) else []),
    ]


def volume_mounts(job: RLHFJob, role: str) -> list[dict[str, Any]]:
    mounts: list[dict[str, Any]] = [
        {"name": "spec", "mountPath": SPEC_DIR, "readOnly": True},
        {"name": "checkpoints", "mountPath": checkpoint_mount_path(job)},
        {"name": "dshm", "mountPath": SHM_DIR},
    ]
    if has_cache(job, role):
        mounts.append({"name": VOLUME_NAME, "mountPath": CACHE_DIR})
    return mounts


def container_resources(resources: Resources) -> dict[str, Any]:
    """CPU, memory and GPU requests equal limits (Guaranteed QoS): training pods must not be the first
    evicted, and KubeRay derives Ray's num-cpus / num-gpus / memory from these. Scratch disk is only
    requested: it reserves the node disk and, under disk pressure, the kubelet evicts pods beyond
    their request first; a limit would evict a pod the moment Ray spills a little more than planned."""
    amounts: dict[str, Any] = {"cpu": resources.cpu, "memory": resources.memory}
    if resources.gpus > 0:
        amounts[GPU_RESOURCE] = str(resources.gpus)
    return {"requests": {**amounts, "ephemeral-storage": SCRATCH}, "limits": dict(amounts)}


def _scheduling(job: RLHFJob) -> dict[str, Any]:
    """Node selection copied onto every pod, so the whole job lands on the intended pool."""
    spec = job.spec
    out: dict[str, Any] = {}
    if spec.node_selector:
        out["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        out["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in spec.tolerations]
    if spec.priority_class_name:
        out["priorityClassName"] = spec.priority_class_name
    return out


def pre_stop_hook(job: RLHFJob) -> dict[str, Any]:
    """Hold a terminating Ray pod until the driver has saved the step in flight (kuberlhf.shutdown).

    Kubernetes runs preStop before it SIGTERMs the pod's `ray start --block`, whose SIGTERM kills the
    actors on that node; KubeRay deletes every pod at once and sends nothing to the driver first."""
    timeout = shutdown.hook_timeout_s(job.spec.termination_grace_period_seconds)
    command = ["kuberlhf", "wait-saved", "--output", output_dir(job), "--timeout", str(timeout)]
    return {"preStop": {"exec": {"command": command}}}


def ray_pod_template(
    job: RLHFJob, namespace: str, role: str, resources: Resources, *, api_access: bool
) -> dict[str, Any]:
    """A Ray node's pod. Only the head (where the driver runs) gets an API token: the driver
    patches its RLHFJob's status; workers never talk to the API server."""
    container = {
        "name": "ray-head" if role == "head" else "ray-worker",
        "image": job.spec.image,
        "env": env(job, namespace, role),
        "resources": container_resources(resources),
        "volumeMounts": volume_mounts(job, role),
        "securityContext": container_security_context(),
        "lifecycle": pre_stop_hook(job),
    }
    return {
        "metadata": {"labels": pod_labels(job, role)},
        "spec": {
            "serviceAccountName": child_names(job).service_account,
            "automountServiceAccountToken": api_access,
            "terminationGracePeriodSeconds": job.spec.termination_grace_period_seconds,
            "securityContext": pod_security_context(),
            "containers": [container],
            "volumes": volumes(job, role, resources.memory),
            **_scheduling(job),
        },
    }


def submitter_pod_template(job: RLHFJob) -> dict[str, Any]:
    """The K8sJobMode submitter, given only so it meets the same security profile as the Ray pods
    (KubeRay's default one runs as the image's user with no security context). KubeRay fills in
    the `ray job submit` command; the entrypoint itself runs on the head, which mounts the spec, so
    the submitter needs no volume and no API token. It keeps Kubernetes' default grace period and no
    preStop hook: it only follows the driver's logs, and stopping it stops nothing in the job."""
    return {
        "metadata": {"labels": pod_labels(job, "submitter")},
        "spec": {
            "serviceAccountName": child_names(job).service_account,
            "automountServiceAccountToken": False,
            "restartPolicy": "Never",
            "securityContext": pod_security_context(),
            "containers": [
                {
                    "name": "ray-job-submitter",
                    "image": job.spec.image,
                    "resources": {
                        "requests": {"cpu": "200m", "memory": "256Mi"},
                        "limits": {"cpu": "1", "memory": "1Gi"},
                    },
                    "securityContext": container_security_context(),
                }
            ],
            **_scheduling(job),
        },
    }
