"""Fixtures shared by every test tier."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One builtin-model cache per test session; pass it as KUBERLHF_CACHE to subprocesses / Ray
    actors so they reuse the models built here instead of building their own."""
    return tmp_path_factory.mktemp("kuberlhf-models")


@pytest.fixture(scope="session")
def tiny_model_dir(model_cache_dir: Path) -> Path:
    """builtin:tiny, built once per session (a few seconds)."""
    from kuberlhf_workers.base.builtin import resolve_model

    return resolve_model("builtin:tiny", model_cache_dir)
