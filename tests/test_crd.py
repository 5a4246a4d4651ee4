"""The generated CRD: fresh on disk, structural, valid for every Kubernetes version, CEL == Python."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import cel
import kubernetes_validate
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from kuberlhf import api, crd

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parent.parent
K8S_VERSIONS = [f"1.{minor}" for minor in range(29, 38)]


def test_checked_in_crd_is_what_kuberlhf_crd_prints() -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "kuberlhf", "crd"], capture_output=True, text=True, check=True
    ).stdout
    assert printed == (ROOT / "crds" / "rlhfjob.yaml").read_text(), "stale: run `make crd`"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_crd_validates_strictly_as_a_kubernetes_object(version: str) -> None:
    kubernetes_validate.validate(crd.build_crd(), version, strict=True)


def _structural_problems(node: dict[str, Any], path: str) -> list[str]:
    problems = []
    if "$ref" in node or "anyOf" in node or "oneOf" in node or "allOf" in node:
        problems.append(f"{path}: $ref / anyOf / oneOf / allOf are not structural")
    if "type" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        problems.append(f"{path}: no type")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}: properties and additionalProperties together")
    for key in ("exclusiveMinimum", "exclusiveMaximum"):
        if key in node and not isinstance(node[key], bool):
            problems.append(f"{path}: {key} must be a boolean in OpenAPI v3.0")
    for name, sub in node.get("properties", {}).items():
        problems += _structural_problems(sub, f"{path}.{name}")
    if "items" in node:
        problems += _structural_problems(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        problems += _structural_problems(node["additionalProperties"], f"{path}{{}}")
    return problems


def test_schema_is_structural() -> None:
    schema = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert _structural_problems(schema, "") == []


def test_structural_check_catches_a_null_union() -> None:
    assert _structural_problems({"type": "object", "properties": {"x": {"anyOf": [{"type": "string"}]}}}, "")


def test_crd_has_status_subresource_and_printer_columns() -> None:
    version = crd.build_crd()["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    names = [c["name"] for c in version["additionalPrinterColumns"]]
    assert {"Phase", "Algorithm", "Step", "Reward", "Age"} <= set(names)
    schema = version["schema"]["openAPIV3Schema"]
    for column in version["additionalPrinterColumns"]:
        node = schema
        *fields, leaf = column["jsonPath"].lstrip(".").split(".")
        if fields == ["metadata"]:
            continue
        for name in fields:
            node = node["properties"][name]
        assert leaf in node["properties"], column


def test_defaults_reach_nested_fields() -> None:
    spec = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["properties"]["rollout"]["default"] == {}
    assert spec["properties"]["rollout"]["properties"]["samplesPerPrompt"]["default"] == 4
    assert "default" not in spec["properties"]["critic"]


URIS = st.sampled_from(["https://mlflow.example", "https://user:pw@mlflow.example/", "file:mlruns", "http://h/a@b"])


def _spec_dicts() -> st.SearchStrategy[dict[str, Any]]:
    gpus = st.integers(0, 4)
    return st.fixed_dictionaries(
        {
            "algorithm": st.sampled_from(["ppo", "grpo", "reinforce_pp", "reinforce_pp_baseline", "rloo",
                                          "dr_grpo"]),
            "model": st.fixed_dictionaries(
                {"actor": st.just("builtin:tiny")},
                optional={"reference": st.just("ref"), "critic": st.just("critic")},
            ),
            "reward": st.fixed_dictionaries(
                {}, optional={"function": st.just("m:f"), "model": st.just("/rm"), "url": st.just("http://x")}
            ),
            "rollout": st.fixed_dictionaries(
                {
                    "engine": st.sampled_from(["auto", "hf", "vllm"]),
                    "samplesPerPrompt": st.integers(1, 4),
                    "replicas": st.integers(1, 4),
                    "tensorParallelSize": st.integers(1, 4),
                    "resources": st.fixed_dictionaries({"gpus": gpus}),
                    "offPolicySteps": st.integers(0, 1),
                    "dynamicSampling": st.fixed_dictionaries({"enabled": st.booleans()}),
                }
            ),
            "actor": st.fixed_dictionaries(
                {"replicas": st.integers(1, 4), "microBatchSize": st.integers(1, 4),
                 "resources": st.fixed_dictionaries({"gpus": gpus})},
                optional={"globalBatchSize": st.integers(1, 64),
                          "lora": st.fixed_dictionaries({"targetModules": st.sampled_from(
                              [["q_proj"], ["q_proj", "k_proj", "v_proj"], ["all-linear"]])})},
            ),
            "kl": st.fixed_dictionaries({"coef": st.sampled_from([0.0, 0.01])}),
            "placement": st.sampled_from(["separate", "colocate"]),
        },
        optional={
            "critic": st.just({"replicas": 1}),
            "data": st.fixed_dictionaries(
                {}, optional={"prompts": st.sampled_from(["builtin:toy", "p.jsonl"]),
                              "promptMix": st.just([{"path": "a.jsonl", "weight": 0.7}])},
            ),
            "tracking": st.fixed_dictionaries({}, optional={"mlflow": st.fixed_dictionaries({"uri": URIS})}),
        },
    )


@settings(max_examples=300, deadline=None)
@given(_spec_dicts())
def test_cel_rules_agree_with_the_python_rules(raw: dict[str, Any]) -> None:
    spec = api.RLHFJobSpec.model_validate(raw)
    as_stored = api.spec_to_dict(spec)
    for rule in api.CROSS_FIELD_RULES:
        assert cel.evaluate(rule.cel, {"self": as_stored}) == rule.holds(spec), rule.field


def test_crd_carries_every_cross_field_rule() -> None:
    spec = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = {r["rule"] for r in spec["x-kubernetes-validations"]}
    assert rules == {r.cel for r in api.CROSS_FIELD_RULES}
    assert all(yaml.safe_dump(r) for r in spec["x-kubernetes-validations"])
