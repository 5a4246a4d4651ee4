"""Command-line tools the tests drive, found on PATH (never at a fixed machine path)."""

from __future__ import annotations

import shutil

import pytest

KUBECTL_MISSING = ("kubectl is not on PATH: install it (https://kubernetes.io/docs/tasks/tools/) "
                   "or put the folder holding it on PATH")


def kubectl_path() -> str | None:
    """The kubectl found on PATH, or None when there is none."""
    return shutil.which("kubectl")


def require_kubectl() -> str:
    """The kubectl found on PATH; fails the calling test (or fixture) when there is none."""
    path = kubectl_path()
    if path is None:
        pytest.fail(KUBECTL_MISSING)
    return path
