"""User code named in a spec as "file.py:name" or "module:name" (reward functions, environments).

A file is looked up next to the spec, then on sys.path (in a cluster the spec sits in a ConfigMap
and the worker image puts user folders on PYTHONPATH), and loaded under a fresh module name so two
specs may both ship a "reward.py". Every error names the spec field and the fix.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import sys
from pathlib import Path
from typing import Any

from kuberlhf.files import find_spec_file

_module_ids = itertools.count()


def _load_file(path: Path, field: str) -> Any:
    name = f"kuberlhf_user_{path.stem}_{next(_module_ids)}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"{field}: cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))  # let the file import helpers that sit next to it
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise ValueError(f"{field}: importing {path} failed: {type(exc).__name__}: {exc}") from exc
    return module


def _load_module(name: str, field: str, example: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        raise ValueError(
            f"{field}: cannot import module {name!r} ({exc}); install it in the worker image, "
            f"or point at a file with 'file.py:{example}'"
        ) from exc
    except Exception as exc:
        raise ValueError(f"{field}: importing {name!r} failed: {type(exc).__name__}: {exc}") from exc


def load_target(ref: str, spec_dir: Path, field: str, example: str) -> tuple[Any, str, str]:
    """(module, attribute name, where it was found) for "file.py:name" or "module:name";
    `example` is how the attribute is called in messages ("function", "ClassName")."""
    target, sep, attr = ref.rpartition(":")
    if not sep or not target or not attr:
        raise ValueError(f"{field}: expected 'file.py:{example}' or 'module:{example}', got {ref!r}")
    if not target.endswith(".py"):
        return _load_module(target, field, example), attr, f"module {target!r}"
    path = find_spec_file(Path(target).expanduser(), spec_dir)
    if path is None:
        raise ValueError(
            f"{field}: file {target} does not exist (relative paths start at {spec_dir}, then sys.path); "
            f"in a cluster, ship it in the worker image on PYTHONPATH or use 'module:{example}'"
        )
    return _load_file(path, field), attr, str(path)
