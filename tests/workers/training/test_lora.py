"""LoRA's view of the actor: base-model names, merged weights equal to peft's own merge, and only
the adapters trainable."""

from __future__ import annotations

from pathlib import Path

import torch

from kuberlhf.api import LoraSpec
from kuberlhf_workers.training.lora import (
    apply_lora,
    base_name,
    export_weights,
    merged_weight,
    sync_weights,
    trainable_count,
)


def test_base_name_strips_the_peft_prefix_and_base_layer():
    assert base_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == (
        "model.layers.0.self_attn.q_proj.weight"
    )
    assert base_name("base_model.model.lm_head.weight") == "lm_head.weight"


def test_merged_weight_adds_the_scaled_low_rank_update():
    w, a, b = torch.zeros(3, 2), torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0], [0.0], [2.0]])
    assert torch.equal(merged_weight(w, a, b, 0.5), torch.tensor([[0.5, 1.0], [0.0, 0.0], [1.0, 2.0]]))
    assert torch.equal(merged_weight(w.T, a, b, 0.5, transposed=True), merged_weight(w, a, b, 0.5).T)


def _adapted(tiny_model_dir: Path, spec: LoraSpec) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), spec)
    with torch.no_grad():  # peft starts B at zero (a no-op adapter): make the merge visible
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    return model


def test_sync_sends_only_the_targeted_weights_merged_as_peft_merges_them(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM

    model = _adapted(tiny_model_dir, LoraSpec(rank=2, alpha=4.0, target_modules=["q_proj", "v_proj"]))
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    out = sync_weights(model)
    assert out and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in out)
    assert set(out) < set(dict(plain.named_parameters()))
    everything = export_weights(model)
    assert set(everything) == set(dict(plain.named_parameters()))
    mine = {name: tensor(lambda p: p.data).clone() for name, (_, tensor) in everything.items()}
    assert all(not torch.equal(mine[n], dict(plain.named_parameters())[n]) for n in out)
    reference = dict(model.merge_and_unload().named_parameters())  # type: ignore[operator]
    for name, tensor in mine.items():
        assert torch.allclose(tensor, reference[name], atol=1e-6), name


def test_only_adapters_train(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM

    model = _adapted(tiny_model_dir, LoraSpec(rank=4))
    full = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert 0 < trainable_count(model) < full / 10


def test_all_linear_targets_every_projection_but_the_head(tiny_model_dir: Path):
    model = _adapted(tiny_model_dir, LoraSpec(target_modules=["all-linear"]))
    names = set(sync_weights(model))
    assert "lm_head.weight" not in names
    assert {n.split(".")[-2] for n in names} >= {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj"}
