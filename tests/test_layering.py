"""The import layers of tests/layering.py hold for the repository, and the check catches breaches."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from layering import PACKAGE_DIRS, check, layer_of, module_files

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent


def test_the_repository_keeps_every_layer_and_purity_contract() -> None:
    assert check(ROOT) == []


def test_every_module_sits_in_a_layer() -> None:
    # The package roots of the operator and the workers hold no code, so they need no layer.
    unlayered = [name for name in module_files(ROOT) if layer_of(name) is None]
    assert unlayered == ["kuberlhf_workers"]
    assert "import" not in (ROOT / PACKAGE_DIRS["kuberlhf_workers"] / "__init__.py").read_text()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the three packages to plant violations in."""
    for folder in PACKAGE_DIRS.values():
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def _plant(path: Path, code: str) -> None:
    path.write_text(path.read_text() + "\n\n" + code + "\n")


def test_a_base_module_importing_the_controller_is_caught(tree: Path) -> None:
    _plant(tree / "workers/kuberlhf_workers/base/samples.py",
           "def later():\n    from kuberlhf_workers.control import driver\n    return driver")
    problems = [p for p in check(tree) if "must stay pure" not in p]  # samples is reached from batch
    assert len(problems) == 1
    assert problems[0].startswith("kuberlhf_workers.base.samples:")
    assert "(kuberlhf_workers.base) may not import a higher one (kuberlhf_workers.control)" in problems[0]


def test_siblings_importing_each_other_are_caught(tree: Path) -> None:
    _plant(tree / "workers/kuberlhf_workers/rewards/sources.py",
           "from kuberlhf_workers.training.batch import collate")
    problems = check(tree)
    assert len(problems) == 1 and "share a layer and must stay independent" in problems[0]


def test_a_heavy_import_reached_from_a_pure_module_is_caught_through_its_imports(tree: Path) -> None:
    # batch is pure; a helper it imports pulls in Ray lazily.
    _plant(tree / "workers/kuberlhf_workers/base/samples.py",
           "def put(x):\n    import ray\n    return ray.put(x)")
    problems = check(tree)
    assert any(
        p.startswith("kuberlhf_workers.training.batch must stay pure but reaches ray")
        and "kuberlhf_workers.base.samples" in p
        for p in problems
    ), problems
