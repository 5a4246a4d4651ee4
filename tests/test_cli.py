"""`kuberlhf validate` / `crd` / `--help` as a user runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parent.parent


def kuberlhf(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kuberlhf", *args], capture_output=True, text=True, cwd=cwd)


def test_validate_accepts_every_example() -> None:
    examples = sorted(str(p) for p in (ROOT / "examples").glob("*.yaml"))
    result = kuberlhf("validate", *examples)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(": valid (") == len(examples)


def test_validate_reports_one_line_per_problem_with_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: kuberlhf.io/v1alpha1\nkind: RLHFJob\nmetadata: {name: bad}\n"
        "spec:\n  algorithm: grpo\n  model: {actor: builtin:tiny}\n  reward: {function: 'mod:fn'}\n"
        "  rollout: {samplesPerPrompt: 1}\n"
    )
    worse = tmp_path / "worse.yaml"
    worse.write_text(
        "apiVersion: kuberlhf.io/v1alpha1\nkind: RLHFJob\nmetadata: {name: worse}\n"
        "spec:\n  algorithm: sftt\n  model: {actor: builtin:tiny}\n  reward: {function: 'mod:fn'}\n"
        "  actor: {replicas: -2, zeroStage: 2, learningRat: 0.1}\n"
    )
    result = kuberlhf("validate", str(bad), str(worse))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith(f"{bad}: spec.rollout.samplesPerPrompt:")
    assert any(line.startswith(f"{worse}: spec.algorithm: got 'sftt'") for line in lines)
    assert any(line.startswith(f"{worse}: spec.actor.replicas:") for line in lines)
    assert any(line.startswith(f"{worse}: spec.actor.learningRat: unknown field") for line in lines)
    assert len(lines) == 4


def test_validate_checks_the_reward_file_exists(tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text(
        "apiVersion: kuberlhf.io/v1alpha1\nkind: RLHFJob\nmetadata: {name: j}\n"
        "spec:\n  model: {actor: builtin:tiny}\n  reward: {function: rewards/missing.py:reward}\n"
    )
    result = kuberlhf("validate", str(spec))
    assert result.returncode == 1
    assert "spec.reward.function: file 'rewards/missing.py' not found" in result.stderr


def test_validate_reports_unreadable_and_non_yaml_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed\n")
    result = kuberlhf("validate", str(broken), str(tmp_path / "absent.yaml"))
    assert result.returncode == 1
    assert "not valid YAML" in result.stderr
    assert "cannot read" in result.stderr


def test_help_lists_every_command() -> None:
    result = kuberlhf("--help")
    assert result.returncode == 0
    for command in ("validate", "crd", "render", "run", "operator", "reward-server"):
        assert command in result.stdout


def test_validate_refuses_what_the_operator_would_refuse(tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text(
        "apiVersion: kuberlhf.io/v1alpha1\nkind: RLHFJob\nmetadata: {name: j}\n"
        "spec:\n  model: {actor: builtin:tiny}\n  reward: {function: 'mod:fn'}\n"
        "  actor: {resources: {memory: lots}}\n"
    )
    result = kuberlhf("validate", str(spec))
    assert result.returncode == 1
    assert "spec.actor.resources.memory" in result.stderr
    assert result.stderr.count(str(spec)) == 1
