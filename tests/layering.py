"""The project's import layers, written down once and checked from the source (AST, no imports).

Two kinds of contract:

- layers: a module may import modules of its own package, of its own layer's package and of the
  layers below it; packages that share a layer are independent (none imports another);
- purity: the pure modules (the maths, the batch glue, the topology, the operator's builders)
  reach none of the heavy runtimes, directly or through any project module they import.

Every import counts, lazy ones inside functions and `TYPE_CHECKING` ones included: a lazy import
still ties the two layers together.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

# Where each import package lives, relative to the repository root.
PACKAGE_DIRS = {
    "kuberlhf": "kuberlhf",
    "kuberlhf_operator": "operator/kuberlhf_operator",
    "kuberlhf_workers": "workers/kuberlhf_workers",
}

# Top to bottom. Packages in one layer are independent of each other.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("kuberlhf.__main__",),
    ("kuberlhf.cli",),
    ("kuberlhf_operator", "kuberlhf_workers.control"),
    ("kuberlhf_workers.rollout", "kuberlhf_workers.training", "kuberlhf_workers.rewards"),
    ("kuberlhf_workers.base",),
    ("kuberlhf",),
)

HEAVY = ("ray", "deepspeed", "kubernetes", "kopf", "vllm", "transformers")
PURE = (
    "kuberlhf.api",
    "kuberlhf.topology",
    "kuberlhf.kube",
    "kuberlhf.placement",
    "kuberlhf.seats",
    "kuberlhf.memory",
    "kuberlhf.jobrefs",
    "kuberlhf_workers.training.algorithms",
    "kuberlhf_workers.training.batch",
    "kuberlhf_workers.training.layout",
    "kuberlhf_workers.training.experience",
    "kuberlhf_operator.builders",
    "kuberlhf_operator.dependencies",
)


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int


def module_files(root: Path) -> dict[str, Path]:
    """Every project module by its dotted name."""
    out = {}
    for package, folder in PACKAGE_DIRS.items():
        base = root / folder
        for path in sorted(base.rglob("*.py")):
            parts = [package, *path.relative_to(base).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path) -> Iterator[Import]:
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(name, alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield Import(name, node.module, node.lineno)
            for alias in node.names:  # `from pkg import submodule`
                yield Import(name, f"{node.module}.{alias.name}", node.lineno)


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def layer_of(module: str) -> tuple[int, str] | None:
    """(layer index, package) of the most specific layered package holding `module`."""
    best: tuple[int, str] | None = None
    for index, packages in enumerate(LAYERS):
        for package in packages:
            if _within(module, package) and (best is None or len(package) > len(best[1])):
                best = (index, package)
    return best


def layer_violations(imports: Iterable[Import], modules: set[str]) -> list[str]:
    problems, seen = [], set()
    for imp in imports:
        if not any(_within(imp.imported, p) for p in PACKAGE_DIRS):
            continue
        target = imp.imported if imp.imported in modules else imp.imported.rpartition(".")[0]
        source, dest = layer_of(imp.importer), layer_of(target)
        if source is None or dest is None or source[1] == dest[1] or (imp.importer, imp.line) in seen:
            continue
        seen.add((imp.importer, imp.line))
        if dest[0] < source[0]:
            problems.append(f"{imp.importer}:{imp.line} imports {imp.imported}: a lower layer "
                            f"({source[1]}) may not import a higher one ({dest[1]})")
        elif dest[0] == source[0]:
            problems.append(f"{imp.importer}:{imp.line} imports {imp.imported}: {source[1]} and "
                            f"{dest[1]} share a layer and must stay independent")
    return problems


def purity_violations(imports: list[Import], modules: set[str]) -> list[str]:
    """Heavy imports reachable from each pure module through project modules."""
    by_importer: dict[str, list[Import]] = {}
    for imp in imports:
        by_importer.setdefault(imp.importer, []).append(imp)
    problems = []
    for pure in PURE:
        seen, stack = {pure}, [(pure, pure)]
        while stack:
            module, via = stack.pop()
            for imp in by_importer.get(module, []):
                if any(_within(imp.imported, h) for h in HEAVY):
                    problems.append(f"{pure} must stay pure but reaches {imp.imported} "
                                    f"({imp.importer}:{imp.line}, via {via})")
                elif imp.imported in modules and imp.imported not in seen:
                    seen.add(imp.imported)
                    stack.append((imp.imported, f"{via} -> {imp.imported}"))
    return problems


def check(root: Path) -> list[str]:
    """Every broken contract of the tree at `root`, one line each (empty when all hold)."""
    files = module_files(root)
    imports = [imp for name, path in files.items() for imp in imports_of(name, path)]
    missing = [p for p in PURE if p not in files]
    return [f"{p}: listed as pure but not found" for p in missing] + layer_violations(
        imports, set(files)
    ) + purity_violations(imports, set(files))
