"""End to end: `kubectl apply` an RLHFJob → the operator → a RayJob → (KubeRay TEST STAND-IN) a real
training run → progress in `kubectl get rlhfjobs` → suspend mid-run (every pod deleted at once, as
KubeRay does: preStop hooks, then SIGTERM to every process) and resume from the checkpoint saved
on suspension → a trained model on the checkpoint volume → `kubectl delete` removes everything
the job owned.

Real: the API emulator process (RBAC enforced), kubectl, the Helm-rendered RBAC, the operator
process, the training program (local Ray, DeepSpeed on gloo). Stand-ins: the API server itself
(the emulator) and KubeRay (tests/emulator/kuberay_standin.py + entrypoint_runner.py).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import Cluster, OperatorProcess, wait_until
from tests.e2e.entrypoint_runner import REPO, EntrypointRunner
from tests.e2e.transcript import Transcript
from tests.emulator.kuberay_standin import KubeRayStandIn

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

EXAMPLE = REPO / "examples" / "tiny-grpo.yaml"
NAMESPACE = "default"
OWNED = ("rayjobs,rayclusters,configmaps,serviceaccounts,roles,rolebindings,persistentvolumeclaims,"
         "networkpolicies,poddisruptionbudgets")
START_TIMEOUT_S = 480  # generous: make test runs another test file beside this one
TRAIN_TIMEOUT_S = 480


def job_status(cluster: Cluster, name: str) -> dict[str, Any]:
    job = json.loads(cluster.kubectl("get", "rlhfjob", name, "-n", NAMESPACE, "-o", "json"))
    return job.get("status") or {}


def owned_objects(cluster: Cluster, name: str) -> set[str]:
    out = cluster.kubectl("get", OWNED, "-n", NAMESPACE, "-l", f"kuberlhf.io/job={name}", "-o", "name")
    return set(out.split())


def metric_steps(output: Path) -> list[int]:
    path = output / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def latest_checkpoint(output: Path, checkpoint_path: str) -> Path | None:
    pointer = output / checkpoint_path / "latest"
    return output / checkpoint_path / pointer.read_text().strip() if pointer.is_file() else None


def keep_transcript(transcript: Transcript, tmp_path: Path) -> str:
    text = transcript.text()
    (tmp_path / "transcript.txt").write_text(text)
    if target := os.environ.get("KUBERLHF_E2E_TRANSCRIPT"):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(text)
    print(f"\n`kubectl get rlhfjobs`, polled every second (changed lines only):\n{text}")
    return text


def test_rlhfjob_trains_suspends_resumes_and_is_cleaned_up_with_least_privilege(
    cluster: Cluster, operator: OperatorProcess, operator_account: tuple[str, str], kuberay: KubeRayStandIn,
    runner: EntrypointRunner, tmp_path: Path,
) -> None:
    spec = yaml.safe_load(EXAMPLE.read_text())
    name, total = spec["metadata"]["name"], spec["spec"]["schedule"]["steps"]
    # No periodic checkpoint before the last step: a checkpoint at the suspension can only come from
    # the stop path (the pods' preStop hooks → the driver finishes its step and saves).
    spec["spec"]["checkpoint"]["everySteps"] = total
    applied = tmp_path / "rlhfjob.yaml"
    applied.write_text(yaml.safe_dump(spec))

    with Transcript(lambda: cluster.kubectl("get", "rlhfjobs", "-n", NAMESPACE, timeout_s=30)) as transcript:
        try:
            cluster.kubectl("apply", "-n", NAMESPACE, "-f", str(applied))
            wait_until(lambda: runner.attempts, START_TIMEOUT_S, "the stand-in to start the entrypoint")
            [first] = runner.attempts
            output = Path(first.argv[first.argv.index("--output") + 1])
            assert output.is_relative_to(runner.workdir / "volumes"), "--output is not on the volume"
            checkpoint_path = spec["spec"]["checkpoint"]["path"]

            # Train a step or two, then suspend mid-run: KubeRay deletes every pod at once.

            def training() -> list[int]:
                assert first.returncode is None, f"the driver exited early:\n{first.log.read_text()[-3000:]}"
                return metric_steps(output)

            wait_until(training, START_TIMEOUT_S, f"the first step ({first.log})", every_s=0.5)
            seen = max(metric_steps(output))
            suspended_at = time.monotonic()
            cluster.kubectl("patch", "rlhfjob", name, "-n", NAMESPACE, "--type", "merge",
                            "-p", '{"spec":{"suspend":true}}')
            wait_until(lambda: job_status(cluster, name).get("phase") == "Suspended", 60, "phase Suspended",
                       every_s=0.5)
            wait_until(lambda: first.returncode is not None, first.grace_s + 10, "the suspended run to end")
            suspend_s = time.monotonic() - suspended_at
            assert first.terminated, "suspending must delete the running pods"
            # The pods were alive when deleted (the driver and its Ray), every pod's preStop hook ran and
            # returned once the driver had saved, and only then did every process get SIGTERM at once.
            assert len(first.alive_at_deletion) >= 3, first.alive_at_deletion
            assert first.hook_returncodes and set(first.hook_returncodes) == {0}, \
                f"{first.hook_returncodes}\n{first.log.read_text()[-3000:]}"
            assert first.sigterm_after_s is not None and first.sigterm_after_s < first.grace_s
            resumed_from = latest_checkpoint(output, checkpoint_path)
            assert resumed_from is not None, \
                f"nothing was saved on suspension:\n{first.log.read_text()[-3000:]}"
            steps_before = metric_steps(output)
            checkpoint_step = int(resumed_from.name.split("-")[1])
            # At most the step in flight is lost: here not even that, since the driver finished it.
            assert checkpoint_step == max(steps_before) >= seen and checkpoint_step < total, \
                f"saved {resumed_from.name}, trained {steps_before}, seen {seen} at the suspension"
            stopped = json.loads((output / "stopped").read_text())
            assert Path(stopped["checkpoint"]).name == resumed_from.name
            print(f"\nsuspend at step {seen}: saved {resumed_from.name}; the hooks held the pods "
                  f"{first.sigterm_after_s:.1f}s, the pods were gone {first.ended_after_s:.1f}s after "
                  "deletion; "
                  f"suspend → run ended {suspend_s:.1f}s; SIGTERM to {len(first.sigterm_pids)} of "
                  f"{len(first.alive_at_deletion)} processes")

            cluster.kubectl("patch", "rlhfjob", name, "-n", NAMESPACE, "--type", "merge",
                            "-p", '{"spec":{"suspend":false}}')
            wait_until(lambda: job_status(cluster, name).get("phase") in ("Succeeded", "Failed"),
                       TRAIN_TIMEOUT_S, "the resumed job to finish", every_s=1.0)
            transcript.poll()
        finally:
            text = keep_transcript(transcript, tmp_path)

    status = job_status(cluster, name)
    logs = "\n".join(f"--- {a.log}\n{a.log.read_text()[-2000:]}" for a in runner.attempts)
    assert len(runner.attempts) == 2, f"expected one run before and one after the suspension:\n{logs}"
    second = runner.attempts[1]
    assert status["phase"] == "Succeeded", f"{status}\n{logs}"
    assert second.returncode == 0 and not second.terminated

    # Progress flowed from the driver into `kubectl get rlhfjobs`: phases in order, a rising step,
    # a reward, and the step never fell back to the start after the resume.
    phases = [row["PHASE"] for row in transcript.rows]
    collapsed = [p for i, p in enumerate(phases) if i == 0 or p != phases[i - 1]]
    assert collapsed[collapsed.index("Launching"):][:2] == ["Launching", "Running"], text
    assert "Suspended" in collapsed and collapsed[-1] == "Succeeded", text
    shown_steps = [int(row["STEP"]) for row in transcript.rows if row["STEP"].isdigit()]
    assert len(set(shown_steps)) >= 3 and shown_steps[-1] == total, text
    suspended_at = phases.index("Suspended")
    before = [int(row["STEP"]) for row in transcript.rows[:suspended_at] if row["STEP"]]
    assert before == sorted(before), f"the STEP column went backwards while training:\n{text}"
    # The driver reports at most every few seconds, so the row that shows "Suspended" may still carry
    # an older step; what matters is that once the job launches again, the step never drops below
    # the last step reported before the relaunch (the checkpoint it resumed from).
    relaunched_at = phases.index("Launching", suspended_at)
    reached = max(int(row["STEP"]) for row in transcript.rows[:relaunched_at] if row["STEP"])
    assert all(int(row["STEP"]) >= reached for row in transcript.rows[relaunched_at:] if row["STEP"]), \
        f"the STEP column fell back after the resume:\n{text}"
    assert any(row["REWARD"] for row in transcript.rows if row["PHASE"] == "Running"), text
    assert status["progress"]["step"] == total and "rewardMean" in status["progress"]

    # Training resumed from the checkpoint saved on suspension, not from zero.
    steps = metric_steps(output)
    restart = len(steps_before)
    assert steps[restart] == checkpoint_step + 1 > 1, steps
    assert steps[restart:] == list(range(checkpoint_step + 1, total + 1)), steps

    # A final Hugging Face model on the checkpoint volume.
    final = latest_checkpoint(output, checkpoint_path)
    assert final is not None and final.name == f"step-{total:06d}"
    assert (final / "model" / "config.json").is_file()
    assert list((final / "model").glob("*.safetensors"))

    # Deleting the RLHFJob removes everything it owned.
    children = owned_objects(cluster, name)
    kinds = {child.split("/")[0] for child in children}
    rbac = "rbac.authorization.k8s.io"
    assert {"configmap", "serviceaccount", f"role.{rbac}", f"rolebinding.{rbac}", "persistentvolumeclaim",
            "rayjob.ray.io", "poddisruptionbudget.policy"} <= kinds, children
    cluster.kubectl("delete", "rlhfjob", name, "-n", NAMESPACE, "--timeout=60s")
    wait_until(lambda: not owned_objects(cluster, name), 30, "the job's children to be garbage-collected")
    assert cluster.kubectl("get", "rlhfjobs", "-n", NAMESPACE, "-o", "name").strip() == ""

    # Least privilege in practice: nothing the operator or the driver did was refused, and the driver
    # only ever read and patched its own RLHFJob's status.
    operator.stop()
    audit = cluster.audit()
    operator_user = "system:serviceaccount:{}:{}".format(*operator_account)
    driver_user = f"system:serviceaccount:{NAMESPACE}:{second.service_account}"
    by_operator = [r for r in audit if r["user"] == operator_user]
    by_driver = [r for r in audit if r["user"] == driver_user]
    assert by_operator and by_driver
    assert not [r for r in audit if r["user"] == "system:anonymous"], "every client must authenticate"
    assert [r for r in by_operator + by_driver if r["status"] in (401, 403)] == []
    # (Discovery, such as GET /api, is open to every authenticated identity and names no object.)
    touched = [r for r in by_driver if r["resource"]]
    assert {(r["resource"], r["namespace"], r["name"], r["subresource"]) for r in touched} == \
        {("rlhfjobs", NAMESPACE, name, "status")}, touched
    assert {r["verb"] for r in touched} <= {"get", "patch"}
    assert any(r["verb"] == "patch" and r["status"] == 200 for r in touched)

