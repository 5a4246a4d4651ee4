"""The Helm chart, rendered, linted and schema-checked by the real Helm v4 engine (helm-python-sdk).

Every built-in object it renders is validated in strict mode (unknown fields fail) against the
OpenAPI schemas of each Kubernetes minor version the chart's kubeVersion claims.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from packaging.version import Version

from kuberlhf import api
from kuberlhf_operator.rbac import driver_rules

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "charts" / "kuberlhf"
RELEASE, NAMESPACE = "kuberlhf", "kuberlhf-system"

# Kinds that are not built into Kubernetes, so kubernetes-validate has no schema for them.
CUSTOM_KINDS = {"ServiceMonitor"}

# The API calls the operator makes, as the operator's authors listed them; files/operator-rbac.yaml
# must grant exactly these.
DECLARED_NAMESPACED = {
    ("kuberlhf.io", "rlhfjobs"): {"get", "list", "watch", "patch"},
    ("kuberlhf.io", "rlhfjobs/status"): {"patch"},
    ("kuberlhf.io", "rlhfjobs/finalizers"): {"update"},
    ("ray.io", "rayjobs"): {"get", "list", "watch", "create", "patch"},
    ("ray.io", "rayclusters"): {"get", "list", "watch"},
    ("", "configmaps"): {"get", "create", "patch"},
    ("", "serviceaccounts"): {"get", "create", "patch"},
    ("", "persistentvolumeclaims"): {"get", "create", "patch"},
    ("rbac.authorization.k8s.io", "roles"): {"get", "create", "patch"},
    ("rbac.authorization.k8s.io", "rolebindings"): {"get", "create", "patch"},
    ("networking.k8s.io", "networkpolicies"): {"get", "create", "patch"},
    ("policy", "poddisruptionbudgets"): {"get", "create", "patch"},
    ("", "events"): {"create"},
}
DECLARED_CLUSTER: dict[tuple[str, str], set[str]] = {}
DECLARED_CLUSTER_WIDE: dict[tuple[str, str], set[str]] = {}

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "namespaced": {"watchNamespaces": ["team-a", "team-b"]},
    "cluster-wide": {"clusterWide": True},
    "existing-service-account": {"serviceAccount": {"create": False, "name": "ops-bot"}, "replicas": 0},
    "everything-set": {
        "image": {"repository": "registry.example.com/kuberlhf/operator", "tag": "0.1.0-rc1",
                  "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "regcred"}],
        "logLevel": "debug",
        "serviceAccount": {"annotations": {"iam.gke.io/gcp-service-account": "ops@example.iam"}},
        "healthPort": 18080,
        "metrics": {"port": 19090, "service": {"type": "NodePort"},
                    "serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "prom"}}},
        "resources": {"requests": {"cpu": "100m", "memory": "200Mi"},
                      "limits": {"cpu": 1, "memory": "512Mi"}},
        "podAnnotations": {"example.com/team": "ml"},
        "podLabels": {"team": "ml"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [
                {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]},
            ]}}},
        "priorityClassName": "system-cluster-critical",
        "env": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"},
                {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
    },
}


def chart_meta() -> dict[str, Any]:
    meta: dict[str, Any] = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    return meta


def supported_versions() -> list[str]:
    """Minor versions kubernetes-validate ships that the chart's kubeVersion admits."""
    match = re.fullmatch(r">=(\d+)\.(\d+)\.0-0", chart_meta()["kubeVersion"])
    assert match, "kubeVersion must stay a plain lower bound like '>=1.29.0-0' (or update this test)"
    floor = Version(f"{match[1]}.{match[2]}")
    versions = {v for v in kubernetes_validate.utils.all_versions() if Version(v) >= floor}
    return sorted(versions, key=Version)


SUPPORTED = supported_versions()


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


def render(chart: helm.Chart, values: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """The rendered objects and NOTES.txt of an install."""
    manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects = [
        doc
        for path, text in sorted(manifests.items())
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]
    notes = next(text for path, text in manifests.items() if path.endswith("NOTES.txt"))
    return objects, notes


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def grants(rules: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    """RBAC rules flattened to {(apiGroup, resource): verbs}."""
    out: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def rbac_file() -> dict[str, dict[tuple[str, str], set[str]]]:
    data = yaml.safe_load((CHART_DIR / "files" / "operator-rbac.yaml").read_text())
    return {section: grants(rules) for section, rules in data.items()}


def test_the_permission_file_grants_exactly_the_declared_operator_api_calls() -> None:
    assert rbac_file() == {
        "namespaced": DECLARED_NAMESPACED,
        "cluster": DECLARED_CLUSTER,
        "clusterWide": DECLARED_CLUSTER_WIDE,
    }


def test_the_operator_holds_every_permission_it_grants_job_drivers() -> None:
    """RBAC escalation prevention refuses to let the operator create a Role granting more than it holds."""
    job = api.parse_job(yaml.safe_load((ROOT / "examples" / "tiny-grpo.yaml").read_text()))
    driver = grants(driver_rules(job))
    assert driver
    held = rbac_file()["namespaced"]
    for key, verbs in driver.items():
        assert verbs <= held.get(key, set()), f"the API server would refuse the driver Role: {key} {verbs}"


def test_by_default_the_operator_holds_rights_only_in_its_release_namespace(chart: helm.Chart) -> None:
    """The default install is namespaced: an operator that can create RayJobs (pods) and Roles in
    every namespace is opt-in (clusterWide: true), not what a plain `helm install` gives."""
    objects, _ = render(chart, {})
    assert of_kind(objects, "ClusterRole") == [] and of_kind(objects, "ClusterRoleBinding") == []
    [role] = of_kind(objects, "Role")
    [binding] = of_kind(objects, "RoleBinding")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == NAMESPACE
    assert grants(role["rules"]) == rbac_file()["namespaced"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": RELEASE, "namespace": NAMESPACE}]
    [deployment] = of_kind(objects, "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [a for a in args if a.startswith("--namespace=")] == [f"--namespace={NAMESPACE}"]


def test_cluster_wide_mode_renders_one_cluster_role_with_all_permissions(chart: helm.Chart) -> None:
    objects, _ = render(chart, VALUE_SETS["cluster-wide"])
    assert of_kind(objects, "Role") == [] and of_kind(objects, "RoleBinding") == []
    [role] = of_kind(objects, "ClusterRole")
    [binding] = of_kind(objects, "ClusterRoleBinding")
    expected = rbac_file()
    assert grants(role["rules"]) == expected["namespaced"] | expected["cluster"] | expected["clusterWide"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": RELEASE, "namespace": NAMESPACE}]
    [deployment] = of_kind(objects, "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not [a for a in args if a.startswith("--namespace")], "no --namespace: kopf watches them all"


def test_namespaced_mode_confines_job_permissions_to_the_watched_namespaces(chart: helm.Chart) -> None:
    objects, _ = render(chart, VALUE_SETS["namespaced"])
    expected = rbac_file()
    # Not even a read of the RLHFJob CRD: kopf runs with scanning off and finds RLHFJobs through
    # discovery, which every authenticated identity may read.
    assert of_kind(objects, "ClusterRole") == [], "namespaced mode needs no cluster-wide right"
    assert of_kind(objects, "ClusterRoleBinding") == []
    roles = of_kind(objects, "Role")
    bindings = of_kind(objects, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for role in roles:
        assert grants(role["rules"]) == expected["namespaced"]
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": RELEASE, "namespace": NAMESPACE}]
    [deployment] = of_kind(objects, "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [a for a in args if a.startswith("--namespace=")] == ["--namespace=team-a", "--namespace=team-b"]


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_rbac_has_no_wildcards_or_privilege_verbs(chart: helm.Chart, value_set: str) -> None:
    objects, _ = render(chart, VALUE_SETS[value_set])
    rules = [rule for o in objects if o["kind"] in ("Role", "ClusterRole") for rule in o["rules"]]
    assert rules
    for rule in rules:
        for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
            assert not any("*" in item for item in rule.get(field, [])), rule
        assert not {"escalate", "bind", "impersonate", "deletecollection"} & set(rule["verbs"]), rule
        assert "secrets" not in rule["resources"], rule


@pytest.mark.parametrize("version", [SUPPORTED[0], SUPPORTED[-1]])
@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_lint_is_clean_in_strict_mode(value_set: str, version: str) -> None:
    """Strict lint, including Helm's deprecated-API check for the oldest and newest supported version."""
    report = helm.lint(CHART_DIR, VALUE_SETS[value_set], strict=True, namespace=NAMESPACE,
                       kube_version=f"v{version}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [] and report["errors"] == []


@pytest.mark.parametrize("version", SUPPORTED)
def test_every_rendered_object_is_valid_for_each_supported_kubernetes(
    chart: helm.Chart, version: str
) -> None:
    for value_set, values in VALUE_SETS.items():
        objects, _ = render(chart, values)
        for obj in objects:
            if obj["kind"] in CUSTOM_KINDS:
                continue
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                name = f"{obj['kind']}/{obj['metadata']['name']}"
                pytest.fail(f"{value_set}: {name} on Kubernetes {version}: {exc.message}")


@pytest.mark.parametrize("version", SUPPORTED)
def test_the_crd_is_valid_for_each_supported_kubernetes(chart: helm.Chart, version: str) -> None:
    [crd] = chart.crds
    kubernetes_validate.validate(yaml.safe_load(crd["data"]), version, strict=True)


def test_supported_versions_start_at_the_claimed_minimum() -> None:
    assert SUPPORTED[0] == chart_meta()["kubeVersion"].removeprefix(">=").removesuffix("-0")
    assert len(SUPPORTED) >= 5


def test_strict_validation_catches_a_misspelt_field(chart: helm.Chart) -> None:
    objects, _ = render(chart, {})
    [deployment] = of_kind(objects, "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, SUPPORTED[0], strict=True)


def test_the_chart_crd_is_the_repository_crd_byte_for_byte(chart: helm.Chart) -> None:
    repo_crd = (ROOT / "crds" / "rlhfjob.yaml").read_bytes()
    [crd] = chart.crds
    chart_crd = (CHART_DIR / "crds" / "rlhfjob.yaml").read_bytes()
    assert chart_crd == repo_crd, "stale copy; run: cp crds/rlhfjob.yaml charts/kuberlhf/crds/"
    assert crd["data"].encode() == repo_crd


def test_nothing_rendered_would_fight_an_existing_kuberay(chart: helm.Chart) -> None:
    crd_names = [yaml.safe_load(c["data"])["metadata"]["name"] for c in chart.crds]
    assert crd_names == ["rlhfjobs.kuberlhf.io"]
    for values in VALUE_SETS.values():
        objects, _ = render(chart, values)
        assert not [o for o in objects if o["apiVersion"].startswith("ray.io/")]
        assert not of_kind(objects, "CustomResourceDefinition")
        pods = [d["spec"]["template"]["spec"] for d in of_kind(objects, "Deployment")]
        assert not [c["image"] for pod in pods for c in pod["containers"] if "kuberay" in c["image"]]


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_the_operator_runs_non_root_on_a_read_only_root_filesystem(chart: helm.Chart, value_set: str) -> None:
    objects, _ = render(chart, VALUE_SETS[value_set])
    [deployment] = of_kind(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod["containers"]:
        sc = container["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], "the only writable path must be an emptyDir"


def test_probes_and_ports_follow_the_values(chart: helm.Chart) -> None:
    objects, _ = render(chart, VALUE_SETS["everything-set"])
    [deployment] = of_kind(objects, "Deployment")
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry.example.com/kuberlhf/operator:0.1.0-rc1"
    assert "--health-port=18080" in container["args"] and "--metrics-port=19090" in container["args"]
    assert "--verbose" in container["args"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"health": 18080, "metrics": 19090}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    [service] = of_kind(objects, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    [monitor] = of_kind(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "15s"}]


def test_defaults_use_the_app_version_image_and_a_single_replica(chart: helm.Chart) -> None:
    objects, _ = render(chart, {})
    [deployment] = of_kind(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"kuberlhf/operator:{chart_meta()['appVersion']}"
    assert of_kind(objects, "ServiceMonitor") == []
    assert [sa["metadata"]["name"] for sa in of_kind(objects, "ServiceAccount")] == [RELEASE]


def test_an_existing_service_account_is_bound_instead_of_created(chart: helm.Chart) -> None:
    objects, _ = render(chart, VALUE_SETS["existing-service-account"])
    assert of_kind(objects, "ServiceAccount") == []
    [deployment] = of_kind(objects, "Deployment")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "ops-bot"
    [binding] = of_kind(objects, "RoleBinding")
    assert binding["subjects"][0]["name"] == "ops-bot"


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"replicas": 2}, "/replicas"),
        ({"imagee": {"repository": "x"}}, "'imagee'"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"watchNamespaces": ["Team_A"]}, "/watchNamespaces/0"),
        ({"watchNamespaces": "team-a"}, "/watchNamespaces"),
        ({"clusterWide": "yes"}, "/clusterWide"),
        ({"kuberay": {"namespace": "Ray_System"}}, "/kuberay/namespace"),
        ({"securityContext": {"runAsUsr": 1000}}, "'runAsUsr'"),
        ({"metrics": {"port": "9090"}}, "/metrics/port"),
        ({"metrics": {"serviceMonitor": {"enabled": True, "intervall": "1m"}}}, "'intervall'"),
        ({"logLevel": "trace"}, "/logLevel"),
        ({"resources": {"limits": {"memory": "lots"}}}, "/resources/limits/memory"),
        ({"env": [{"value": "x"}]}, "/env/0"),
    ],
)
def test_bad_values_are_rejected_naming_the_key(
    chart: helm.Chart, values: dict[str, Any], named: str
) -> None:
    with pytest.raises(helm.HelmValuesError) as caught:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert named in str(caught.value)


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"serviceAccount": {"create": False}}, "serviceAccount.name"),
        ({"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}},
         "metrics.service.enabled"),
        ({"clusterWide": True, "watchNamespaces": ["team-a"]}, "leave watchNamespaces empty"),
    ],
)
def test_inconsistent_values_fail_rendering_with_the_fix(
    chart: helm.Chart, values: dict[str, Any], named: str
) -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape(named)):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_notes_tell_how_to_start_and_watch_a_job(chart: helm.Chart) -> None:
    _, notes = render(chart, {})
    assert f"handles RLHFJobs in: {NAMESPACE} (and has no rights elsewhere)" in notes
    assert "kubectl get crd rayjobs.ray.io" in notes
    assert f"kubectl get rlhfjobs -n {NAMESPACE} -w" in notes
    assert f"deployment/{RELEASE}" in notes
    assert "kubectl delete crd rlhfjobs.kuberlhf.io" in notes
    _, notes = render(chart, VALUE_SETS["namespaced"])
    assert "team-a, team-b" in notes
    assert "kubectl get rlhfjobs -n team-a -w" in notes
    _, notes = render(chart, VALUE_SETS["cluster-wide"])
    assert "every namespace (clusterWide: true)" in notes
    assert "kubectl get rlhfjobs -w" in notes


def test_the_packaged_chart_carries_the_crd_and_renders(tmp_path: Path) -> None:
    archive = helm.package(CHART_DIR, destination=tmp_path)
    assert Path(archive).name == "kuberlhf-0.1.0.tgz"
    with helm.Chart.load(archive) as packaged:
        assert [c["data"].encode() for c in packaged.crds] == [(ROOT / "crds" / "rlhfjob.yaml").read_bytes()]
        assert "files/operator-rbac.yaml" in [f["name"] for f in packaged.files]
        objects, _ = render(packaged, {})
    assert {o["kind"] for o in objects} == {"Role", "RoleBinding", "Deployment", "Service", "ServiceAccount"}


def test_operator_pods_carry_the_label_job_network_policies_admit(chart: helm.Chart) -> None:
    from kuberlhf_operator.netpol import OPERATOR_LABEL

    objects, _ = render(chart, {})
    (deployment,) = of_kind(objects, "Deployment")
    assert deployment["spec"]["template"]["metadata"]["labels"][OPERATOR_LABEL] == "true"


@pytest.mark.parametrize(("values", "kuberay"), [({}, "ray-system"), ({"kuberay": {"namespace": "kuberay"}},
                                                                      "kuberay")])
def test_the_operator_is_told_both_namespaces_job_network_policies_pin(
        chart: helm.Chart, values: dict[str, Any], kuberay: str) -> None:
    """Its own from the downward API (the release's namespace), KubeRay's from the values; the CLI
    reads POD_NAMESPACE as the default of --operator-namespace."""
    from kuberlhf.cli import build_parser

    objects, _ = render(chart, values)
    (deployment,) = of_kind(objects, "Deployment")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert f"--kuberay-namespace={kuberay}" in container["args"]
    args = build_parser().parse_args(["operator", *container["args"]])
    assert args.kuberay_namespace == kuberay
