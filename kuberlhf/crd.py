"""Generate the RLHFJob CustomResourceDefinition from the API models.

Pydantic emits JSON Schema with $refs, anyOf-null unions and titles; Kubernetes wants a
structural OpenAPI v3 schema: everything inlined, a type on every node, `nullable`
instead of null unions, no `additionalProperties` beside `properties`, and OpenAPI
3.0's boolean `exclusiveMinimum`. This module is that translation and nothing else.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml
from pydantic import BaseModel

from kuberlhf import api

JSONSchema = dict[str, Any]

PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Algorithm", "type": "string", "jsonPath": ".spec.algorithm"},
    {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step"},
    # What the driver trains: schedule.steps, or the steps an offline run's epochs take.
    {"name": "Total", "type": "integer", "jsonPath": ".status.progress.totalSteps"},
    {"name": "Reward", "type": "number", "jsonPath": ".status.progress.rewardMean"},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
    {"name": "Accuracy", "type": "number", "jsonPath": ".status.progress.evalAccuracy", "priority": 1},
    {"name": "KL", "type": "number", "jsonPath": ".status.progress.kl", "priority": 1},
    {"name": "Samples/s", "type": "number", "jsonPath": ".status.progress.samplesPerSecond",
     "priority": 1},
    {"name": "Turns", "type": "number", "jsonPath": ".status.progress.turnsMean", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

_DROPPED_KEYS = {"title", "$defs", "additionalProperties"}


def _resolve(node: Any, defs: dict[str, JSONSchema]) -> Any:
    if isinstance(node, list):
        return [_resolve(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
        extra = {k: v for k, v in node.items() if k != "$ref"}
        return _resolve({**target, **extra}, defs)
    return {k: _resolve(v, defs) for k, v in node.items()}


def _structural(node: JSONSchema) -> JSONSchema:
    """Rewrite one resolved JSON Schema node (and its children) into structural form."""
    node = dict(node)
    variants = node.pop("anyOf", None)
    if variants is not None:
        non_null = [v for v in variants if v.get("type") != "null"]
        if len(non_null) != 1:
            raise ValueError(f"cannot express union {variants} structurally")
        merged = {**non_null[0], **node}
        if len(non_null) < len(variants):
            merged["nullable"] = True
            if merged.get("default", "") is None:
                merged.pop("default")
        node = merged
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if "enum" in node and "type" not in node:
        node["type"] = "string"
    for bound in ("exclusiveMinimum", "exclusiveMaximum"):
        if bound in node and not isinstance(node[bound], bool):
            node["minimum" if bound == "exclusiveMinimum" else "maximum"] = node[bound]
            node[bound] = True
    out: JSONSchema = {}
    for key, value in node.items():
        if key in _DROPPED_KEYS:
            continue
        if key == "properties":
            out["properties"] = {name: _structural(sub) for name, sub in value.items()}
        elif key == "items":
            out["items"] = _structural(value)
        else:
            out[key] = value
    if node.get("type") == "object" and "properties" not in node:
        additional = node.get("additionalProperties")
        if isinstance(additional, dict):
            out["additionalProperties"] = _structural(additional)
    for name, sub in out.get("properties", {}).items():
        # An absent sub-object is defaulted to {} so the API server fills its leaves.
        optional = name not in out.get("required", [])
        if sub.get("type") == "object" and "properties" in sub and not sub.get("nullable") and optional:
            sub.setdefault("default", {})
    return out


def model_schema(model: type[BaseModel]) -> JSONSchema:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(_resolve(raw, raw.get("$defs", {})))


def _cel_field_path(field: str) -> str:
    return field.removeprefix("spec")


def spec_schema() -> JSONSchema:
    schema = model_schema(api.RLHFJobSpec)
    schema["x-kubernetes-validations"] = [
        {"rule": r.cel, "message": r.message, "fieldPath": _cel_field_path(r.field),
         "reason": "FieldValueInvalid"}
        for r in api.CROSS_FIELD_RULES
    ]
    return schema


def status_schema() -> JSONSchema:
    schema = model_schema(api.RLHFJobStatus)
    for sub in schema["properties"].values():
        sub.pop("default", None)
    return schema


def build_crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{api.PLURAL}.{api.GROUP}",
            "labels": {"app.kubernetes.io/name": "kuberlhf", "app.kubernetes.io/part-of": "kuberlhf"},
        },
        "spec": {
            "group": api.GROUP,
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": list(api.SHORT_NAMES),
                "categories": ["all", "kuberlhf"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "RLHFJob runs one RLHF / RL post-training job on a Ray cluster.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                "status": status_schema(),
                            },
                        }
                    },
                }
            ],
        },
    }


def crd_yaml() -> str:
    header = "# Generated by `kuberlhf crd` from kuberlhf/api.py. Do not edit by hand.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=100)
