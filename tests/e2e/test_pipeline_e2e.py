"""End to end, a pipeline: SFT → reward model → GRPO applied with one `kubectl apply`. The later
stages wait (Pending, DependenciesReady=False) while the earlier ones train for real (KubeRay TEST
STAND-IN running the entrypoints), start in order as each succeeds, and find the earlier models
on the checkpoint volume the three share."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import Cluster, OperatorProcess, wait_until
from tests.e2e.entrypoint_runner import REPO, EntrypointRunner
from tests.emulator.kuberay_standin import KubeRayStandIn

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

NAMESPACE = "default"
DATA = REPO / "examples" / "offline"
SHARED = {"volume": {"claimName": "pipeline"}}


def stages() -> list[dict[str, Any]]:
    """examples/pipeline, shortened, on one shared claim, with the data read from this checkout
    (the stand-in's 'pods' run on this machine, as the image's files would be there)."""
    docs = []
    for name in ("1-sft", "2-rm", "3-grpo"):
        doc = yaml.safe_load((REPO / "examples" / "pipeline" / f"{name}.yaml").read_text())
        spec = doc["spec"]
        for key in ("train", "eval", "prompts"):
            if key in spec["data"]:
                spec["data"][key] = str((REPO / "examples" / "pipeline" / spec["data"][key]).resolve())
        spec["checkpoint"] = {**spec.get("checkpoint", {}), **SHARED}
        spec["schedule"] = {"steps": 3}
        docs.append(doc)
    return docs


def phase(cluster: Cluster, name: str) -> str:
    job = json.loads(cluster.kubectl("get", "rlhfjob", name, "-n", NAMESPACE, "-o", "json"))
    return str((job.get("status") or {}).get("phase") or "")


def condition(cluster: Cluster, name: str, kind: str) -> dict[str, Any]:
    job = json.loads(cluster.kubectl("get", "rlhfjob", name, "-n", NAMESPACE, "-o", "json"))
    return next((c for c in (job.get("status") or {}).get("conditions", []) if c["type"] == kind), {})


def test_a_three_stage_pipeline_applied_at_once_runs_each_stage_after_the_one_it_uses(
    cluster: Cluster, operator: OperatorProcess, kuberay: KubeRayStandIn, runner: EntrypointRunner,
    tmp_path: Path,
) -> None:
    manifest = tmp_path / "pipeline.yaml"
    manifest.write_text(yaml.safe_dump_all(stages()))
    cluster.kubectl("apply", "-n", NAMESPACE, "-f", str(manifest))

    wait_until(lambda: condition(cluster, "pipeline-grpo", "DependenciesReady").get("reason")
               == "WaitingForDependency", 60, "the GRPO stage to wait")
    assert "pipeline-sft" in condition(cluster, "pipeline-grpo", "DependenciesReady")["message"]
    assert phase(cluster, "pipeline-rm") == "Pending"

    def finished(name: str) -> bool:
        now = phase(cluster, name)
        logs = "\n".join(f"--- {a.log}\n{a.log.read_text()[-2000:]}" for a in runner.attempts)
        assert now != "Failed", f"{name} failed:\n{logs}"
        return now == "Succeeded"

    for name in ("pipeline-sft", "pipeline-rm", "pipeline-grpo"):
        wait_until(lambda name=name: finished(name), 480, f"{name} to succeed", every_s=1.0)

    started = [a.rayjob for a in runner.attempts]
    assert started == ["pipeline-sft-ray", "pipeline-rm-ray", "pipeline-grpo-ray"], started
    volume = runner.volume_dir(NAMESPACE, "pipeline")
    for name in ("pipeline-sft", "pipeline-rm"):
        assert (volume / name / "final" / "config.json").is_file(), name
    grpo_log = runner.attempts[-1].log.read_text()
    assert "step 3/3" in grpo_log, grpo_log[-2000:]
    assert condition(cluster, "pipeline-grpo", "DependenciesReady")["status"] == "True"
