"""Import boundaries: the operator image carries only kopf + kubernetes, never the training stack."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parent.parent
HEAVY = ("torch", "ray", "deepspeed", "vllm", "transformers", "kuberlhf_workers")

# Runs in a fresh interpreter where importing any heavy module raises, as in the operator image.
PROBE = textwrap.dedent(
    """
    import importlib, pkgutil, sys
    HEAVY = {heavy!r}

    class Block:
        def find_spec(self, name, path=None, target=None):
            if any(name == h or name.startswith(h + ".") for h in HEAVY):
                raise ImportError(f"{{name}} is not in the operator image")
            return None

    sys.meta_path.insert(0, Block())
    import kuberlhf_operator
    for mod in ("kuberlhf.api", "kuberlhf.crd", "kuberlhf.cli", "kuberlhf.topology"):
        importlib.import_module(mod)
    names = [m.name for m in pkgutil.walk_packages(kuberlhf_operator.__path__, "kuberlhf_operator.")]
    for name in names:
        importlib.import_module(name)
    print(len(names))
    """
)


def test_operator_imports_without_the_training_stack() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY)], capture_output=True, text=True, cwd="/"
    )
    assert result.returncode == 0, result.stderr


def test_the_probe_would_catch_a_heavy_import() -> None:
    probe = PROBE.format(heavy=HEAVY) + "\nimport kuberlhf_workers.base.samples\n"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd="/")
    assert result.returncode != 0
    assert "not in the operator image" in result.stderr


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_operator_module_imports_workers_even_lazily() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            m for m in _imported_modules(path) if m.startswith("kuberlhf_workers")
        )
        for path in (ROOT / "operator").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_top_level_package_shadows_the_standard_library_operator_module() -> None:
    assert not (ROOT / "operator" / "__init__.py").exists()
    import operator

    assert Path(operator.__file__).parent != ROOT / "operator"
