"""Joining a DeepSpeed world on CPU survives what a killed rank leaves behind."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

JOIN = textwrap.dedent(
    """
    from kuberlhf_workers.base.transports import free_port
    from kuberlhf_workers.training.rank import join_world
    import importlib

    join_world(("127.0.0.1", free_port()), 0, 1, 30.0)
    backend = importlib.import_module("deepspeed.comm.comm").cdb
    print("joined", backend.get_world_size(), backend.shm_comm_op)
    """
)


def test_a_rank_joins_its_world_although_a_killed_rank_left_the_extension_build_lock(tmp_path: Path) -> None:
    # What a rank SIGKILLed while DeepSpeed JIT-loaded its shared-memory op leaves: the build
    # folder's lock. torch waits on it forever, so every later DeepSpeed start on the host hung.
    stale = tmp_path / "extensions" / "deepspeed_shm_comm"
    stale.mkdir(parents=True)
    (stale / "lock").touch()
    env = os.environ | {"TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
    try:
        done = subprocess.run(
            [sys.executable, "-c", JOIN], env=env, capture_output=True, text=True, timeout=90
        )
    except subprocess.TimeoutExpired:
        pytest.fail("joining the world waited on the stale extension lock")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "joined 1 None" in done.stdout
