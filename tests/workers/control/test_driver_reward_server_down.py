"""A job whose reward server is down fails fast with an error naming the server, never hangs."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from run_specs import load, write_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]



def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_dead_reward_server_fails_the_run_with_its_url(ray_session, tiny_model_dir: Path, tmp_path: Path):
    from kuberlhf_workers.control.driver import Driver

    url = f"http://127.0.0.1:{_closed_port()}"
    spec = write_spec(tmp_path, tiny_model_dir, schedule={"steps": 2})
    job = load(spec)
    job.spec.reward.function = None
    job.spec.reward.url = url
    job.spec.reward.timeout_seconds = 2.0
    job.spec.reward.max_retries = 1

    started = time.monotonic()
    with pytest.raises(Exception) as failure:
        Driver(job, tmp_path, tmp_path / "out").run()
    assert url in str(failure.value), failure.value
    assert time.monotonic() - started < 120, "a dead reward server must fail the step, not hang it"
