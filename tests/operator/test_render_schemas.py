"""`kuberlhf render` output is what a real cluster accepts: the RayJob (and its RayCluster spec)
against the real KubeRay v1.7.0 CRDs, every built-in object against Kubernetes' own schemas,
both in strict mode so an unknown field fails instead of being silently dropped."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kuberay_schema
import pytest
import yaml
from kuberay_schema import (
    CRDS_ENV,
    KubeRayCRDsMissing,
    builtin_versions,
    kuberay_crd_file,
    kuberay_crds_dir,
    validate_builtin,
    validate_kuberay,
)

from kuberlhf import api, cli, specfile
from kuberlhf_operator import builders

pytestmark = pytest.mark.unit

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
EXAMPLE_FILES = sorted(p.name for p in EXAMPLES.glob("*.yaml"))
K8S_VERSIONS = builtin_versions("1.29", "1.34")


def render(path: Path, *extra: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        cli.main(["render", str(path), *extra])
    out = capsys.readouterr()
    return int(exited.value.code or 0), out.out, out.err


def as_raycluster(rayjob: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": f"{rayjob['metadata']['name']}-abcde"},
        "spec": rayjob["spec"]["rayClusterSpec"],
    }


def pod_templates_as_builtins(rayjob: dict[str, Any]) -> list[dict[str, Any]]:
    """Each pod template of a RayJob as a v1 PodTemplate, so Kubernetes' own schemas judge it too."""
    cluster = rayjob["spec"]["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"], rayjob["spec"]["submitterPodTemplate"]]
    templates += [g["template"] for g in cluster["workerGroupSpecs"]]
    return [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"pod-{i}"}, "template": t}
            for i, t in enumerate(templates)]


def everything_set() -> api.RLHFJob:
    """A job exercising every optional knob the builders turn into fields."""
    doc = yaml.safe_load((EXAMPLES / "llama3-8b-ppo-rm.yaml").read_text())
    doc["metadata"]["uid"] = "0d5c0b1e-2222-4b4b-8d8d-0123456789ab"
    spec = doc["spec"]
    spec["reward"]["tokenSecretRef"] = {"name": "rm-auth", "key": "bearer"}
    spec["tolerations"].append({"key": "spot", "operator": "Equal", "value": "true", "effect": "NoExecute",
                                "tolerationSeconds": 300})
    spec["queueName"] = "team-queue"
    spec["reference"] = {"colocateWithActor": False, "replicas": 2, "resources": {"gpus": 1, "cpu": "500m"}}
    return api.parse_job(doc)


@pytest.mark.parametrize("kind", ["RayJob", "RayCluster", "RayService"])
def test_the_kuberay_crds_are_where_the_helper_looks(kind: str) -> None:
    # Fails (never skips) with where to get them when they are missing.
    assert kuberay_crd_file(kind).parent == kuberay_crds_dir()


def test_k8s_versions_cover_1_29_to_1_34() -> None:
    assert K8S_VERSIONS == ["1.29", "1.30", "1.31", "1.32", "1.33", "1.34"]


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_render_output_of_every_example_validates_strictly(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = render(EXAMPLES / name, capsys=capsys)
    assert code == 0, err
    # Shared Python objects would come out as YAML anchors, which kubectl users do not expect.
    assert "&id" not in out
    objects = list(yaml.safe_load_all(out))
    assert objects == builders.build_all(specfile.load_job(EXAMPLES / name, check_files=False),
                                         namespace=objects[0]["metadata"]["namespace"])
    rayjob = objects[-1]
    assert validate_kuberay(rayjob) == []
    assert validate_kuberay(as_raycluster(rayjob)) == []
    for obj in objects[:-1] + pod_templates_as_builtins(rayjob):
        for version in K8S_VERSIONS:
            assert validate_builtin(obj, version) == [], (obj["kind"], version)


def test_every_optional_field_still_validates_strictly() -> None:
    objects = builders.build_all(everything_set(), "team-a")
    assert validate_kuberay(objects[-1]) == []
    assert validate_kuberay(as_raycluster(objects[-1])) == []
    assert "reference" in {g["groupName"] for g in objects[-1]["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    for obj in objects[:-1] + pod_templates_as_builtins(objects[-1]):
        for version in K8S_VERSIONS:
            assert validate_builtin(obj, version) == [], (obj["kind"], version)


def test_render_honours_the_namespace_flag(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = render(EXAMPLES / "tiny-grpo.yaml", "--namespace", "team-b", capsys=capsys)
    objects = list(yaml.safe_load_all(out))
    assert code == 0
    assert {o["metadata"]["namespace"] for o in objects} == {"team-b"}
    binding = next(o for o in objects if o["kind"] == "RoleBinding")
    assert binding["subjects"][0]["namespace"] == "team-b"


def test_render_of_a_bad_quantity_names_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = yaml.safe_load((EXAMPLES / "tiny-grpo.yaml").read_text())
    doc["spec"]["actor"]["resources"] = {"memory": "8GB"}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    code, out, err = render(bad, capsys=capsys)
    assert code == 1 and out == ""
    assert "spec.actor.resources.memory: '8GB' is not a Kubernetes quantity" in err


# The negative side: the strict checks really fail on what a real API server would refuse.

def _rayjob() -> dict[str, Any]:
    return copy.deepcopy(builders.build_rayjob(everything_set(), "team-a"))


def test_strict_kuberay_validation_rejects_an_unknown_rayjob_field() -> None:
    rayjob = _rayjob()
    rayjob["spec"]["entryPoint"] = "typo"
    assert validate_kuberay(rayjob) == [
        "spec: Additional properties are not allowed ('entryPoint' was unexpected)"
    ]


def test_strict_kuberay_validation_rejects_an_unknown_field_deep_in_a_pod_template() -> None:
    rayjob = _rayjob()
    container = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]
    container["securityContext"]["runAsRoot"] = False
    errors = validate_kuberay(rayjob)
    assert len(errors) == 1
    where = "spec.rayClusterSpec.workerGroupSpecs[1].template.spec.containers[0].securityContext:"
    assert errors[0].startswith(where)
    assert "'runAsRoot' was unexpected" in errors[0]


def test_kuberay_validation_rejects_a_malformed_quantity_and_a_wrong_type() -> None:
    rayjob = _rayjob()
    group = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    group["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = "64GB"
    group["replicas"] = "4"
    errors = validate_kuberay(rayjob)
    assert len(errors) == 2
    assert any(e.startswith("spec.rayClusterSpec.workerGroupSpecs[0].replicas:") for e in errors)
    assert any("resources.limits.memory" in e for e in errors)


def test_only_defaulted_required_fields_may_be_left_out() -> None:
    rayjob = _rayjob()
    group = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    del group["minReplicas"], group["maxReplicas"]  # KubeRay defaults these
    assert validate_kuberay(rayjob) == []
    del group["groupName"]
    assert validate_kuberay(rayjob) == [
        "spec.rayClusterSpec.workerGroupSpecs[0]: 'groupName' is a required property"
    ]


def test_auth_options_accept_only_kuberay_modes() -> None:
    rayjob = _rayjob()
    rayjob["spec"]["rayClusterSpec"]["authOptions"] = {"mode": "password"}
    errors = validate_kuberay(rayjob)
    assert len(errors) == 1 and errors[0].startswith("spec.rayClusterSpec.authOptions.mode:")


def test_strict_builtin_validation_rejects_an_unknown_field() -> None:
    role = builders.build_driver_rbac(everything_set(), "team-a")[1]
    role["rules"][0]["resourceName"] = ["typo"]
    for version in K8S_VERSIONS:
        errors = validate_builtin(role, version)
        assert len(errors) == 1 and "'resourceName' was unexpected" in errors[0]


def test_missing_crds_folder_says_where_to_get_them_and_how_to_point_at_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CRDS_ENV, str(tmp_path))
    assert kuberay_crds_dir() == tmp_path
    for attempt in (lambda: validate_kuberay(_rayjob()), lambda: kuberay_crd_file("RayService")):
        with pytest.raises(KubeRayCRDsMissing) as missing:
            attempt()
        message = str(missing.value)
        assert isinstance(missing.value, FileNotFoundError)
        for needed in (CRDS_ENV, str(tmp_path), "KubeRay v1.7.0", "github.com/ray-project/kuberay",
                       "ray-operator/config/crd/bases", "ray.io_rayjobs.yaml", "ray.io_rayclusters.yaml",
                       "ray.io_rayservices.yaml"):
            assert needed in message, (needed, message)


def test_a_clone_with_nothing_beside_it_fails_naming_the_release_and_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(CRDS_ENV, raising=False)
    monkeypatch.setattr(kuberay_schema, "REPO_ROOT", tmp_path / "kuberlhf")
    assert kuberay_crds_dir() == tmp_path / "shared" / "data" / "kuberay-crds"
    with pytest.raises(KubeRayCRDsMissing) as missing:
        kuberay_crd_file("RayJob")
    message = str(missing.value)
    for needed in (f"{CRDS_ENV} is unset", "KubeRay v1.7.0", "tag v1.7.0", f"set {CRDS_ENV}"):
        assert needed in message, (needed, message)
