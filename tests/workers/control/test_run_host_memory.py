"""`kuberlhf run`'s host-memory check before a CPU run: which limit it reads, and the warning it prints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kuberlhf import api
from kuberlhf_workers.control.run import host_memory, warn_host_memory

pytestmark = pytest.mark.unit


def test_the_container_limit_wins_when_it_is_below_the_machines_memory(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16384000 kB\nMemFree:         1000 kB\n")
    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    assert host_memory(meminfo, [v2, v1]) == (16384000 * 1024, "this machine")  # neither file exists
    v2.write_text("max\n")  # cgroup v2 without a limit
    v1.write_text("9223372036854771712\n")  # cgroup v1 without a limit
    assert host_memory(meminfo, [v2, v1]) == (16384000 * 1024, "this machine")
    v2.write_text(f"{4 * 2**30}\n")
    available, source = host_memory(meminfo, [v2, v1])
    assert available == 4 * 2**30 and str(v2) in source and "container" in source


@pytest.mark.skipif(torch.cuda.is_available(), reason="the check is for CPU runs; this host has a GPU")
def test_a_cpu_run_too_big_for_this_host_is_warned_about_naming_role_estimate_memory_and_fix(
    capsys: pytest.CaptureFixture[str],
) -> None:
    doc = {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": "big"},
        "spec": {"algorithm": "sft", "model": {"actor": "org/Model-70B"}, "data": {"train": "t.jsonl"},
                 "actor": {"replicas": 2, "zeroStage": 3}},
    }
    spec = api.parse_job(doc).spec
    warn_host_memory(spec, "auto")  # inside a RayJob the pods' limits apply, not this host's
    assert capsys.readouterr().err == ""
    warn_host_memory(spec, "local")
    err = capsys.readouterr().err
    available, source = host_memory()
    assert err.startswith("warning: spec.actor: its 2 DeepSpeed ranks need about "), err
    assert f"more than the {available / 2**30:.1f} GiB of {source}" in err
    assert "smaller model" in err  # 70B fits no CPU host by any one change
    small = spec.model_copy(update={"model": spec.model.model_copy(update={"actor": "builtin:tiny"})})
    warn_host_memory(small, "local")
    assert capsys.readouterr().err == ""
