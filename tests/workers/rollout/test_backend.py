"""The backend table acts on the resolved engine: `rollout.engine: auto` (the default) builds a real
engine, never a lookup of "auto", and the weight-sync path agrees with the engine it built."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kuberlhf.api import RLHFJobSpec
from kuberlhf.engine_choice import resolve
from kuberlhf_workers.base.attention import CPU_EAGER_MAX_TOKENS
from kuberlhf_workers.base.engine_transports import engine_backend
from kuberlhf_workers.base.samples import GenerationRequest
from kuberlhf_workers.rollout.backend import make_backend
from kuberlhf_workers.rollout.hf import HFBackend


def tiny_spec(model: str, **rollout: object) -> RLHFJobSpec:
    return RLHFJobSpec.model_validate(
        {"model": {"actor": model}, "reward": {"function": "r.py:f"}, "rollout": rollout}
    )


@pytest.mark.unit
def test_auto_on_builtin_tiny_builds_the_hf_engine_and_syncs_through_the_actor(tiny_model_dir: Path) -> None:
    spec = tiny_spec("builtin:tiny")
    assert spec.rollout.engine == "auto"
    backend = make_backend(spec, tiny_model_dir, torch.device("cpu"))
    assert isinstance(backend, HFBackend)
    result = backend.generate(GenerationRequest(["Count: 1 2"], samples_per_prompt=2, max_new_tokens=4))
    assert len(result.response_ids) == 2
    assert engine_backend(spec) is None  # the hf engine receives in the rollout actor
    resolved, choice = resolve(spec)
    assert resolved.rollout.engine == "hf" and engine_backend(resolved) is None, choice


@pytest.mark.unit
def test_the_hf_engine_on_a_cpu_generates_with_eager_attention_up_to_the_limit_and_sdpa_past_it(
    tiny_model_dir: Path,
) -> None:
    def kernel(**data: object) -> str:
        spec = RLHFJobSpec.model_validate({
            "model": {"actor": "builtin:tiny"}, "reward": {"function": "r.py:f"},
            "rollout": {"engine": "hf"}, "data": data})
        backend = make_backend(spec, tiny_model_dir, torch.device("cpu"))
        assert isinstance(backend, HFBackend)
        found: str = backend.model.config._attn_implementation
        return found

    assert kernel(maxPromptTokens=64, maxNewTokens=32) == "eager"
    assert kernel(maxPromptTokens=CPU_EAGER_MAX_TOKENS - 32, maxNewTokens=32) == "eager"
    assert kernel(maxPromptTokens=CPU_EAGER_MAX_TOKENS, maxNewTokens=32) == "sdpa"
