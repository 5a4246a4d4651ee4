"""`rollout.engine: auto`: the pure choice from facts, the facts read from a model's config, and the
resolved spec every reader of spec.rollout.engine acts on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kuberlhf import api
from kuberlhf.engine_choice import (
    CPU_VLLM_MIN_WORK,
    EngineFacts,
    choose_engine,
    engine_facts,
    generated_tokens,
    resolve,
    resolved_engine,
)

pytestmark = pytest.mark.unit


def spec_of(model: str = "builtin:tiny", **changes: Any) -> api.RLHFJobSpec:
    raw: dict[str, Any] = {"model": {"actor": model}, "reward": {"function": "r.py:f"}, **changes}
    return api.RLHFJobSpec.model_validate(raw)


DEFAULT_TOKENS = 100 * 8 * 4 * 256  # default steps x promptsPerStep x samplesPerPrompt x maxNewTokens
BIG = 2 * CPU_VLLM_MIN_WORK / DEFAULT_TOKENS
SMALL = CPU_VLLM_MIN_WORK / DEFAULT_TOKENS / 2


def facts(*, vllm: bool = True, gpu: bool = False, parameters: float | None = BIG,
          head: int | None = 64) -> EngineFacts:
    return EngineFacts(vllm_installed=vllm, on_gpu=gpu, parameters=parameters, head_size=head)


def test_auto_is_the_default_and_an_explicit_engine_is_kept_whatever_the_facts() -> None:
    assert spec_of().rollout.engine == "auto"
    for engine in ("hf", "vllm"):
        choice = choose_engine(spec_of(rollout={"engine": engine}), facts(vllm=False, parameters=1))
        assert choice.engine == engine


@pytest.mark.parametrize(
    ("given", "engine", "why"),
    [
        (facts(gpu=True, parameters=SMALL), "vllm", "GPU"),
        (facts(gpu=True, vllm=False), "hf", "not installed"),
        (facts(vllm=False), "hf", "not installed"),
        (facts(parameters=BIG), "vllm", ">="),
        (facts(parameters=SMALL), "hf", "<"),
        (facts(parameters=CPU_VLLM_MIN_WORK / DEFAULT_TOKENS), "vllm", ">="),
        (facts(head=48), "hf", "head size 48"),
        (facts(head=None, parameters=None), "hf", "not readable"),
    ],
)
def test_auto_picks_by_device_installation_size_and_head_size(
    given: EngineFacts, engine: str, why: str
) -> None:
    choice = choose_engine(spec_of(), given)
    assert choice.engine == engine and why in choice.reason, choice


def test_on_cpu_a_short_run_stays_on_hf_where_a_long_one_of_the_same_model_takes_vllm() -> None:
    assert generated_tokens(spec_of()) == DEFAULT_TOKENS
    short = spec_of(schedule={"steps": 10})
    assert generated_tokens(short) == DEFAULT_TOKENS // 10
    assert choose_engine(short, facts(parameters=BIG)).engine == "hf"
    assert choose_engine(spec_of(schedule={"steps": 1000}), facts(parameters=SMALL)).engine == "vllm"
    assert choose_engine(spec_of(), facts(parameters=BIG), steps=10).engine == "hf"  # --max-steps 10
    # The measured cases (bench/generation.py: 8 prompts x 4 samples x 32 tokens a step)
    bench = {"rollout": {"promptsPerStep": 8, "samplesPerPrompt": 4}, "data": {"maxNewTokens": 32}}
    for parameters, steps, engine in ((11e6, 300, "hf"), (11e6, 500, "vllm"), (134.5e6, 20, "hf"),
                                      (134.5e6, 40, "vllm"), (0.15e6, 5000, "hf")):
        spec = spec_of(schedule={"steps": steps}, **bench)
        assert choose_engine(spec, facts(parameters=parameters)).engine == engine, (parameters, steps)


def test_offline_algorithms_generate_nothing_and_never_need_vllm() -> None:
    sft = spec_of(algorithm="sft", data={"train": "t.jsonl"})
    assert choose_engine(sft, facts(gpu=True)).engine == "hf"


def test_tensor_parallelism_needs_vllm_and_says_so_when_it_is_missing() -> None:
    tp = spec_of(rollout={"tensorParallelSize": 2, "resources": {"gpus": 2}})
    assert choose_engine(tp, facts(gpu=True)).engine == "vllm"
    assert choose_engine(tp, facts(gpu=False, parameters=SMALL)).engine == "vllm"
    with pytest.raises(ValueError, match=r"^spec\.rollout\.tensorParallelSize: .*not installed"):
        choose_engine(tp, facts(vllm=False))


def test_lora_targets_that_split_a_fused_group_keep_auto_on_hf() -> None:
    split = spec_of(actor={"lora": {"targetModules": ["q_proj"]}})
    assert choose_engine(split, facts(gpu=True)).engine == "hf"
    whole = spec_of(actor={"lora": {"targetModules": ["q_proj", "k_proj", "v_proj"]}})
    assert choose_engine(whole, facts(gpu=True)).engine == "vllm"


def test_a_multi_turn_environment_does_not_change_the_choice() -> None:
    episodes = spec_of(environment={"class": "env.py:Env"})
    assert choose_engine(episodes, facts(gpu=True)).engine == "vllm"
    assert choose_engine(episodes, facts(parameters=SMALL)).engine == "hf"


def test_facts_come_from_the_config_without_weights(tmp_path: Path) -> None:
    tiny = engine_facts(spec_of())
    assert (tiny.on_gpu, tiny.head_size) == (False, 32) and tiny.parameters is not None
    assert tiny.parameters < 1e6
    smol = engine_facts(spec_of("builtin:smollm2-135m", rollout={"resources": {"gpus": 1}},
                                actor={"resources": {"gpus": 1}}))
    assert smol.on_gpu and smol.head_size == 64 and smol.parameters == pytest.approx(134.5e6, rel=0.01)
    config = {"hidden_size": 1024, "num_hidden_layers": 8, "vocab_size": 1000, "num_attention_heads": 16,
              "intermediate_size": 4096}
    (tmp_path / "config.json").write_text(json.dumps(config))
    local = engine_facts(spec_of(str(tmp_path)))
    assert local.head_size == 64 and local.parameters is not None and local.parameters > 1e8
    named = engine_facts(spec_of("/nowhere/Some-Model-7B"))  # no config: the size in its name
    assert (named.parameters, named.head_size) == (7e9, None)


def test_builtin_tiny_stays_on_hf_and_the_resolved_spec_names_the_engine() -> None:
    spec, choice = resolve(spec_of())
    assert spec.rollout.engine == choice.engine == "hf" == resolved_engine(spec_of())
    assert choice.describe("auto").startswith("rollout.engine: auto -> hf (")
    explicit, kept = resolve(spec_of(rollout={"engine": "vllm"}))
    assert explicit.rollout.engine == kept.engine == "vllm"
