"""Finding files a spec names relative to itself, on a laptop and in a cluster alike."""

from __future__ import annotations

import sys
from pathlib import Path


def find_spec_file(path: Path, spec_dir: Path) -> Path | None:
    """Next to the spec on a laptop; in a cluster the spec sits in a ConfigMap mount, so the same
    relative path is also looked up on sys.path (the worker image puts its reward folders there)."""
    if path.is_absolute():
        return path if path.is_file() else None
    for candidate in (spec_dir / path, *(Path(p) / path for p in sys.path if p)):
        if candidate.is_file():
            return candidate
    return None
