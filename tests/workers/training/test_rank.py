"""A rank on CPU: joining its world survives what a killed rank leaves behind, and it loads only
checkpoints whose DeepSpeed state is laid out as its own."""

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


def test_a_rank_refuses_a_checkpoint_whose_deepspeed_state_another_kind_of_run_wrote(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    # A CPU run and a GPU run of one `precision: bf16` spec share the job's fingerprint, but the
    # CPU's autocast keeps an fp32 module and DeepSpeed's bf16 mode does not: their states differ.
    import deepspeed.comm
    import torch
    from transformers import AutoModelForCausalLM

    from kuberlhf.api import TrainerSpec
    from kuberlhf_workers.base.transports import free_port
    from kuberlhf_workers.training.layout import Layout
    from kuberlhf_workers.training.rank import STATE_FORMAT_FILE, DeepSpeedRank, state_format_problem

    cpu = torch.device("cpu")
    rank = DeepSpeedRank("actor", TrainerSpec(zero_stage=0), Layout(4, 1, 4, 1), 0, cpu, "bf16")
    assert rank.autocast and rank.state_format == "fp32-module"
    build = lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)  # noqa: E731
    rank.join(("127.0.0.1", free_port()), build, 120)
    checkpoint = tmp_path / "step-3" / "deepspeed"
    try:
        rank.save(str(checkpoint), None, str(tiny_model_dir))
        marker = checkpoint / "actor" / STATE_FORMAT_FILE
        assert marker.is_file()
        rank.load(str(checkpoint))  # its own kind of state loads
        marker.write_text('{"format": "deepspeed-bf16"}')  # as a GPU bf16 rank writes it
        with pytest.raises(ValueError, match="bf16 mode") as refused:
            rank.load(str(checkpoint))
    finally:
        deepspeed.comm.destroy_process_group()
    message = str(refused.value)
    assert str(checkpoint) in message and "--no-resume" in message
    assert str(tmp_path / "step-3" / "model") in message
    marker.unlink()  # checkpoints from before the marker load as before
    assert state_format_problem(str(checkpoint), "actor", "deepspeed-bf16") is None


def test_the_specs_seed_decides_a_fresh_value_head_on_every_build(tiny_model_dir: Path) -> None:
    # A reward model's head is not in the checkpoint it starts from: without the seed, two runs of
    # one spec trained two different reward models.
    import deepspeed.comm
    import torch

    from kuberlhf.api import RLHFJobSpec, TrainerSpec
    from kuberlhf_workers.base.transports import free_port
    from kuberlhf_workers.training.layout import Layout
    from kuberlhf_workers.training.offline import RewardModelObjective
    from kuberlhf_workers.training.rank import DeepSpeedRank

    spec = RLHFJobSpec.model_validate({"algorithm": "rm", "model": {"actor": "builtin:tiny"},
                                       "data": {"train": "prefs.jsonl"}})
    objective = RewardModelObjective(spec, 0)

    before = iter(range(3))

    def head(seed: int) -> torch.Tensor:
        torch.manual_seed(next(before))  # whatever the process drew before must not matter
        rank = DeepSpeedRank("actor", TrainerSpec(zero_stage=0), Layout(4, 1, 4, 1), 0, torch.device("cpu"))
        build = lambda: objective.build_model(str(tiny_model_dir), 0)  # noqa: E731
        rank.join(("127.0.0.1", free_port()), build, 120, seed)
        try:
            return rank.model.module.score.weight.detach().clone()
        finally:
            deepspeed.comm.destroy_process_group()

    first, again, other = head(42), head(42), head(43)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
