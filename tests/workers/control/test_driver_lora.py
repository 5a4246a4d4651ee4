"""GRPO with LoRA on the actor (local Ray, hf rollout, DeepSpeed ZeRO-2 on CPU): the adapters learn,
a weight sync hands the engine exactly the merged weights, and the export loads without peft."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from run_specs import REPO, job_dict, load, write_spec

from kuberlhf.api import parse_job

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

STEPS = 10
# builtin:tiny has two layers: adapters on the attention and MLP alone barely move its digits
# reward in 10 steps; with one on the (untied) output head too they do.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
LORA = {"rank": 8, "alpha": 32, "targetModules": TARGETS}


def _sync_bytes(meta: list) -> int:
    return sum(torch.Size(m.shape).numel() * torch.empty(0, dtype=getattr(torch, m.dtype)).element_size()
               for m in meta)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_grpo_with_lora_learns_syncs_merged_weights_and_exports_a_plain_model(
    ray_session, tiny_model_dir: Path, tmp_path: Path, precision: str
):
    import ray

    from kuberlhf_workers.control.driver import Driver

    actor = {"learningRate": 3e-2, "microBatchSize": 16, "lora": LORA}
    job = parse_job(job_dict(tiny_model_dir, actor=actor, schedule={"steps": STEPS}, precision=precision))
    shutil.copy(REPO / "examples" / "rewards" / "digits.py", tmp_path / "digits.py")
    driver = Driver(job, tmp_path, tmp_path / "out")
    driver.setup()
    exported = tmp_path / "exported"
    try:
        before = ray.get(driver.rollouts[0].parameters())
        rewards = [driver.train_step(step)["reward_mean"] for step in range(STEPS)]
        merged = ray.get(driver.actors[0].parameters())
        masters = ray.get(driver.actors[0].parameters(master=True))
        synced = ray.get(driver.rollouts[0].parameters())
        meta = ray.get(driver.actors[0].param_meta())
        ray.get([a.export(str(exported)) for a in driver.actors])
    finally:
        driver.release()
    from transformers import AutoModelForCausalLM

    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.05, f"mean reward did not rise with LoRA: {rewards}"
    assert not (exported / "adapter_config.json").exists()
    loaded = dict(AutoModelForCausalLM.from_pretrained(exported).named_parameters())
    assert set(loaded) == set(merged) == set(synced) == set(before)
    moved = [n for n in merged if not torch.equal(before[n], merged[n])]
    assert moved and {m.name for m in meta} >= set(moved), "only adapted weights change, and all are synced"
    assert "model.embed_tokens.weight" not in {m.name for m in meta}
    for name, tensor in merged.items():
        assert torch.equal(synced[name], tensor), f"{name} differs in the rollout engine after the sync"
        # The export merges the fp32 master adapters (under bf16 the frozen base is its bf16 copy).
        assert torch.equal(loaded[name].detach(), masters[name]), f"{name} differs in the exported model"
    full = sum(t.numel() * 4 for t in before.values())
    print(f"LoRA sync bytes {_sync_bytes(meta)} of {full} for every weight; rewards {rewards}")


def test_grpo_with_lora_stopped_and_resumed_ends_like_an_unbroken_run(
    ray_session, tiny_model_dir: Path, tmp_path: Path
):
    """The adapters (and their optimizer state) are in DeepSpeed's checkpoint: a resumed run
    continues them instead of starting from fresh adapters."""
    from safetensors.torch import load_file

    from kuberlhf_workers.control.driver import Driver

    actor = {"learningRate": 3e-2, "microBatchSize": 16, "lora": LORA}
    spec = write_spec(tmp_path / "spec", tiny_model_dir, actor=actor, schedule={"steps": 4})
    unbroken = Driver(load(spec), spec.parent, tmp_path / "unbroken").run()

    def stop_at_two(step: int, total: int, metrics: dict, last: str | None) -> None:
        if step == 2:
            stopping.request_stop()

    stopping = Driver(load(spec), spec.parent, tmp_path / "run", callbacks=[stop_at_two])
    assert stopping.run().step == 2
    resumed = Driver(load(spec), spec.parent, tmp_path / "run").run()

    assert [h["step"] for h in resumed.history] == [3, 4]
    for before, after in zip(unbroken.history[2:], resumed.history, strict=True):
        assert after["reward_mean"] == pytest.approx(before["reward_mean"], abs=1e-6), after["step"]
    final_a = load_file(str(Path(str(unbroken.model)) / "model.safetensors"))
    final_b = load_file(str(Path(str(resumed.model)) / "model.safetensors"))
    assert set(final_a) == set(final_b) and not any("lora" in n for n in final_a)
    for name, tensor in final_a.items():
        assert torch.allclose(final_b[name], tensor, atol=1e-5), f"{name} differs after resume"
