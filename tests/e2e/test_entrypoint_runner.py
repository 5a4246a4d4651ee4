"""The stand-in head pod's pure parts: how a RayJob's entrypoint becomes a local command."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.entrypoint_runner import head_pod, local_argv, map_path

pytestmark = pytest.mark.unit

ENTRYPOINT = "kuberlhf run /etc/kuberlhf/rlhfjob.yaml --ray-address auto --output /checkpoints/j --quiet"
RAYJOB = {
    "metadata": {"name": "j-ray", "namespace": "ns"},
    "spec": {
        "entrypoint": ENTRYPOINT,
        "rayClusterSpec": {"headGroupSpec": {"template": {"spec": {
            "serviceAccountName": "j-driver",
            "containers": [{"name": "ray-head", "env": [
                {"name": "KUBERLHF_JOB_NAME", "value": "j"},
                {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
                "volumeMounts": [{"name": "spec", "mountPath": "/etc/kuberlhf"},
                                 {"name": "checkpoints", "mountPath": "/checkpoints"}]}],
            "volumes": [{"name": "spec", "configMap": {"name": "j-spec"}},
                        {"name": "checkpoints", "persistentVolumeClaim": {"claimName": "j-checkpoints"}}],
        }}}},
    },
}


def test_head_pod_reads_account_literal_env_and_mounts_from_the_rayjob() -> None:
    pod = head_pod(RAYJOB)
    assert pod.service_account == "j-driver"
    assert pod.env == {"KUBERLHF_JOB_NAME": "j"}, "env from fieldRefs has no literal value to copy"
    assert pod.mounts["/checkpoints"] == {"name": "checkpoints",
                                          "persistentVolumeClaim": {"claimName": "j-checkpoints"}}


def test_map_path_maps_only_paths_under_a_mount_point() -> None:
    mapping = {"/checkpoints": Path("/tmp/vol"), "/etc/kuberlhf": Path("/tmp/spec")}
    assert map_path("/checkpoints/j/x", mapping) == "/tmp/vol/j/x"
    assert map_path("/checkpoints", mapping) == "/tmp/vol"
    assert map_path("/checkpoints-old/j", mapping) == "/checkpoints-old/j"
    assert map_path("--quiet", mapping) == "--quiet"


def test_map_path_prefers_the_deepest_mount_point() -> None:
    mapping = {"/data": Path("/tmp/a"), "/data/inner": Path("/tmp/b")}
    assert map_path("/data/inner/f", mapping) == "/tmp/b/f"


def test_local_argv_maps_mounts_and_starts_a_private_ray() -> None:
    mapping = {"/checkpoints": Path("/tmp/vol"), "/etc/kuberlhf": Path("/tmp/spec")}
    assert local_argv(ENTRYPOINT, mapping) == ["kuberlhf", "run", "/tmp/spec/rlhfjob.yaml", "--ray-address",
                                               "local", "--output", "/tmp/vol/j", "--quiet"]
