"""Fixtures shared by the worker tests that run the training program on a local Ray."""

from __future__ import annotations

import pytest
from run_specs import local_ray


@pytest.fixture(scope="module")
def ray_session():
    """One private Ray per test module (modules that need a different one override this)."""
    yield from local_ray()
