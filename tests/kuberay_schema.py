"""Offline schema checks for the objects we send to Kubernetes.

We cannot run a kube-apiserver here, so these helpers judge objects the way one would:
custom resources against the real KubeRay v1.7.0 CRD schemas (kept unmodified outside the
project), built-in kinds with kubernetes-validate. The CRD schemas are adjusted exactly as the
API server's behaviour requires:

- `nullable: true` becomes a union with null (jsonschema has no such keyword);
- strict field validation (what `kubectl apply` asks for) is emulated by
  `additionalProperties: false` on every object node that lists `properties` and does not
  preserve unknown fields, so a misspelt or invented field is an error, not silently pruned;
- a property with a `default` is dropped from `required`, because the API server fills
  defaults in before it validates (KubeRay lists minReplicas / maxReplicas as required but
  defaults them).

CEL rules (`x-kubernetes-validations`) are not evaluated.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate.utils import all_versions

REPO_ROOT = Path(__file__).resolve().parent.parent
CRDS_ENV = "KUBERLHF_KUBERAY_CRDS"
# The CRDs are megabytes of YAML: the C loader reads them ten times faster when libyaml is there.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_CRD_FILES = {
    "RayJob": "ray.io_rayjobs.yaml",
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
KUBERAY_RELEASE = "v1.7.0"
CRDS_SOURCE = f"https://github.com/ray-project/kuberay/tree/{KUBERAY_RELEASE}/ray-operator/config/crd/bases"


class KubeRayCRDsMissing(FileNotFoundError):
    """A KubeRay CRD file is not where kuberay_crds_dir() looks; the message says how to get it."""


def kuberay_crds_dir() -> Path:
    """Where the KubeRay CRDs live: $KUBERLHF_KUBERAY_CRDS, else <repo>/../shared/data/kuberay-crds.

    Tests and benchmarks find them here and nowhere else: read them through kuberay_crd_file()."""
    override = os.environ.get(CRDS_ENV)
    return Path(override) if override else REPO_ROOT.parent / "shared" / "data" / "kuberay-crds"


def kuberay_crd_file(kind: str, folder: Path | None = None) -> Path:
    """The CRD file of a KubeRay kind (RayJob, RayCluster, RayService) in `folder` (default
    kuberay_crds_dir()). Raises KubeRayCRDsMissing, naming the release to take the CRDs from and
    the variable to set, when it is not there."""
    if kind not in _CRD_FILES:
        raise ValueError(f"no KubeRay CRD for kind {kind!r}; known: {sorted(_CRD_FILES)}")
    folder = kuberay_crds_dir() if folder is None else folder
    path = folder / _CRD_FILES[kind]
    if not path.is_file():
        where = (f"{folder} (from ${CRDS_ENV})" if os.environ.get(CRDS_ENV)
                 else f"{folder} (the default; ${CRDS_ENV} is unset)")
        raise KubeRayCRDsMissing(
            f"KubeRay CRD {path.name} not found in {where}. Tests and benchmarks need the unmodified "
            f"CRDs of the KubeRay {KUBERAY_RELEASE} release: {', '.join(_CRD_FILES.values())}, from "
            f"github.com/ray-project/kuberay, ray-operator/config/crd/bases at tag {KUBERAY_RELEASE} "
            f"({CRDS_SOURCE}). Put the three files in one folder and set {CRDS_ENV} to that folder.")
    return path


def load_kuberay_crd(kind: str, folder: Path | None = None) -> dict[str, Any]:
    """The parsed CRD of a KubeRay kind, found through kuberay_crd_file()."""
    return yaml.load(kuberay_crd_file(kind, folder).read_text(), Loader=_LOADER)  # type: ignore[no-any-return]


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of an OpenAPI v3 CRD schema turned into a strict JSON Schema (see module docstring).

    Walks only schema positions, so a field that happens to be called "required" or "default"
    is never mistaken for a keyword.
    """
    out = dict(schema)
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if isinstance(out.get("items"), dict):
        out["items"] = strict_schema(out["items"])
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = strict_schema(out["additionalProperties"])
    for keyword in ("anyOf", "allOf", "oneOf"):
        if keyword in out:
            out[keyword] = [strict_schema(s) for s in out[keyword]]
    if "properties" in out:
        properties = {name: strict_schema(prop) for name, prop in out["properties"].items()}
        if "required" in out:
            out["required"] = [n for n in out["required"] if "default" not in properties.get(n, {})]
        if out.get("x-kubernetes-embedded-resource"):
            implicit = {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {}}
            properties = {**implicit, **properties}
        out["properties"] = properties
        if not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


@functools.cache
def _validator(kind: str, version: str, crds_dir: Path) -> jsonschema.protocols.Validator:
    crd = load_kuberay_crd(kind, crds_dir)
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    if version not in versions:
        raise ValueError(f"{kind} CRD has no version {version!r}; it serves {sorted(versions)}")
    schema = strict_schema(versions[version]["schema"]["openAPIV3Schema"])
    validator_cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    return validator_cls(schema)


def _where(path: Any) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def validate_kuberay(obj: dict[str, Any]) -> list[str]:
    """Every schema violation of a KubeRay object (RayJob, RayCluster, RayService), one line each."""
    group, _, version = str(obj.get("apiVersion", "")).partition("/")
    if group != "ray.io":
        return [f"apiVersion: {obj.get('apiVersion')!r} is not a KubeRay (ray.io) apiVersion"]
    validator = _validator(str(obj.get("kind")), version, kuberay_crds_dir())
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{_where(e.absolute_path)}: {e.message}" for e in errors]


def validate_builtin(obj: dict[str, Any], k8s_version: str = "1.31") -> list[str]:
    """Schema violations of a built-in object for one Kubernetes version (strict: unknown fields fail).

    kubernetes-validate stops at the first violation, so the list holds at most one entry.
    """
    try:
        kubernetes_validate.validate(obj, k8s_version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{_where(exc.absolute_path)}: {exc.message}"]
    return []


def builtin_versions(first: str = "1.29", last: str = "1.34") -> list[str]:
    """The Kubernetes minor versions between first and last that kubernetes-validate ships schemas for."""

    def minor(v: str) -> int:
        return int(v.split(".")[1])

    shipped = {".".join(v.split(".")[:2]) for v in all_versions()}
    return sorted((v for v in shipped if minor(first) <= minor(v) <= minor(last)), key=minor)
