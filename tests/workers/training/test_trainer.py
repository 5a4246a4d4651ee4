"""The trainer's old log-probs under a rollout correction: read off the loss's own forward when
an epoch makes one optimizer step, equal to the separate no-grad pass they replace."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kuberlhf.api import RLHFJobSpec
from kuberlhf_workers.base.samples import GenerationResult
from kuberlhf_workers.training.batch import collate
from kuberlhf_workers.training.experience import make_experience
from kuberlhf_workers.training.layout import Layout
from kuberlhf_workers.training.lora import apply_lora
from kuberlhf_workers.training.objectives import PolicyObjective
from kuberlhf_workers.training.trainer import has_dropout, old_from_loss

pytestmark = pytest.mark.unit

CPU = torch.device("cpu")


def _spec(**extra: object) -> RLHFJobSpec:
    return RLHFJobSpec.model_validate({
        "model": {"actor": "builtin:tiny"}, "reward": {"function": "m:f"},
        "rollout": {"samplesPerPrompt": 2}, "data": {"maxNewTokens": 6},
        "loss": {"rolloutCorrection": {"mode": "token-clip"}}, **extra})


def _model(tiny_model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    loaded: torch.nn.Module = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return loaded


def test_old_logprobs_read_off_the_loss_pass_equal_the_no_grad_pass_and_start_the_ratio_at_one(
    tiny_model_dir: Path,
) -> None:
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (3, 5, 2, 4)]
    responses = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (6, 4, 5, 1)]
    # Behaviour log-probs far from the trainer's: a stale engine, which the correction weighs.
    logps = [(-8.0 + 0.5 * torch.randn(len(r), generator=g)).tolist() for r in responses]
    result = GenerationResult([""] * 4, [""] * 4, prompts, responses, logps, [True] * 4)
    spec = _spec()
    exp = make_experience(spec, collate(result, pad_id=0), torch.tensor([1.0, 0.0, 0.5, -1.0]), None, None)
    model, objective, rows = _model(tiny_model_dir), PolicyObjective(spec), slice(0, 4)
    separate = objective.old_logprobs(model.eval(), exp, rows, CPU)

    model.train()
    exp.old_logp, exp.old_from_loss = torch.zeros_like(exp.batch.behaviour_logp), True
    _, metrics = objective.loss(model, exp, rows, CPU)
    real = exp.batch.response_mask.bool()
    torch.testing.assert_close(exp.old_logp[real], separate[real], rtol=0, atol=1e-6)
    assert metrics["clip_fraction"] == 0.0  # π/π_old is exactly 1 at the first update
    assert abs(metrics["rollout_kl"]) > 1.0  # while the correction still sees the stale engine


def test_the_loss_pass_stands_in_only_with_one_update_per_epoch_and_no_dropout(tiny_model_dir: Path) -> None:
    model = _model(tiny_model_dir)
    assert old_from_loss(Layout(rows=32, world=2, micro=8, accumulation=2), model)
    assert not old_from_loss(Layout(rows=32, world=2, micro=8, accumulation=1), model)  # two updates
    assert not has_dropout(model)
    from kuberlhf.api import LoraSpec

    assert has_dropout(apply_lora(_model(tiny_model_dir), LoraSpec(rank=4, dropout=0.1)))
    assert not has_dropout(apply_lora(_model(tiny_model_dir), LoraSpec(rank=4)))
    model.config.attention_dropout = 0.1
    assert has_dropout(model)
    assert not old_from_loss(Layout(rows=32, world=2, micro=8, accumulation=2), model)
