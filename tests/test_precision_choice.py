"""`precision: auto` on an all-CPU run: bf16 for a real model on a CPU with bf16 instructions, fp32
for toy models, unreadable configs and CPUs without them; runs with GPUs leave it to their nodes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kuberlhf import api
from kuberlhf.precision_choice import (
    CPU_BF16_MIN_HIDDEN,
    PrecisionFacts,
    actor_hidden,
    choose_precision,
    uses_gpus,
)

pytestmark = pytest.mark.unit


def spec_of(model: str = "builtin:tiny", **changes: Any) -> api.RLHFJobSpec:
    raw: dict[str, Any] = {"model": {"actor": model}, "reward": {"function": "r.py:f"}, **changes}
    return api.RLHFJobSpec.model_validate(raw)


def test_a_real_model_on_a_bf16_cpu_computes_in_bf16():
    choice = choose_precision(spec_of(), PrecisionFacts(cpu_bf16=True, hidden=CPU_BF16_MIN_HIDDEN))
    assert choice.precision == "bf16"
    assert choice.describe("auto").startswith("precision: auto -> bf16 (CPU with bf16 instructions")


@pytest.mark.parametrize(
    ("facts", "reason"),
    [
        (PrecisionFacts(cpu_bf16=True, hidden=CPU_BF16_MIN_HIDDEN - 1), "slower for a model this small"),
        (PrecisionFacts(cpu_bf16=False, hidden=4096), "no bf16 matrix instructions"),
        (PrecisionFacts(cpu_bf16=True, hidden=None), "config is not readable"),
    ],
    ids=["toy-model", "no-bf16-cpu", "unknown-size"],
)
def test_fp32_where_bf16_would_not_pay_says_why(facts: PrecisionFacts, reason: str):
    choice = choose_precision(spec_of(), facts)
    assert choice.precision == "fp32" and reason in choice.reason


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_an_explicit_precision_is_kept(precision: str):
    choice = choose_precision(spec_of(precision=precision), PrecisionFacts(cpu_bf16=False, hidden=None))
    assert choice.precision == precision and choice.reason == "as set in spec.precision"


def test_the_hidden_size_comes_from_a_builtin_recipe_or_a_local_config(tmp_path: Path):
    assert actor_hidden(spec_of("builtin:tiny")) == 64
    assert actor_hidden(spec_of("builtin:smollm2-135m")) == 576
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 512}))
    assert actor_hidden(spec_of(str(tmp_path))) == 512
    assert actor_hidden(spec_of(str(tmp_path / "missing"))) is None


def test_any_role_on_gpus_leaves_auto_to_the_workers():
    assert not uses_gpus(spec_of())
    assert uses_gpus(spec_of(actor={"resources": {"gpus": 1}}))
    assert uses_gpus(spec_of(rollout={"resources": {"gpus": 1}}))
    assert uses_gpus(spec_of(reference={"resources": {"gpus": 1}}))
