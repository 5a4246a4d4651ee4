"""Multi-turn episodes on the real hf engine (builtin:tiny) with environments written here."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from kuberlhf.api import EnvironmentSpec
from kuberlhf_workers.base.samples import GenerationRequest, summarize
from kuberlhf_workers.rollout.episodes import EnvironmentFailed, decode, encode_observation, run_episodes
from kuberlhf_workers.rollout.hf import HFBackend
from kuberlhf_workers.training.batch import collate, token_logprobs
from kuberlhf_workers.training.forward import forward_logits

PROMPTS = ["What is 3 * 4?", "Count from 1 to 3:"]
RECORDS = tuple({"prompt": p, "answer": "12"} for p in PROMPTS)
OBSERVATION = " = 84\n"


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> HFBackend:
    return HFBackend(tiny_model_dir)


def request(samples: int = 3, **kw: Any) -> GenerationRequest:
    return GenerationRequest(PROMPTS, samples, max_new_tokens=6, seed=7, records=RECORDS, **kw)


def env_spec(**kw: Any) -> EnvironmentSpec:
    return EnvironmentSpec.model_validate({"class": "tests:Env", "maxTokens": 200, **kw})


class ThreeTurns:
    """Never done: every turn is answered with the same observation; rewards 0.1 per step."""

    seen: ClassVar[list[str]] = []

    def __init__(self, record: dict[str, Any]):
        self.record = record

    def reset(self) -> str:
        return "\n"

    def step(self, action: str) -> tuple[str | None, float, bool]:
        ThreeTurns.seen.append(action)
        return OBSERVATION, 0.1, False


def segments(ids: list[int], mask: list[int]) -> list[tuple[int, list[int]]]:
    """The response cut into runs of equal mask value: [(mask, ids), ...]."""
    out: list[tuple[int, list[int]]] = []
    for token, m in zip(ids, mask, strict=True):
        if out and out[-1][0] == m:
            out[-1][1].append(token)
        else:
            out.append((m, [token]))
    return out


def test_the_loss_mask_is_zero_exactly_on_observation_tokens_and_one_on_the_models_across_turns(engine):
    ThreeTurns.seen = []
    result = run_episodes(engine, ThreeTurns, env_spec(), 3, request())
    observation = encode_observation(engine.tokenizer, OBSERVATION)
    actions = iter(ThreeTurns.seen)
    assert result.turns == [3] * 6 and result.episode_rewards == pytest.approx([0.3] * 6)
    assert result.loss_mask is not None
    for ids, mask, logps in zip(result.response_ids, result.loss_mask, result.response_logprobs, strict=True):
        runs = segments(ids, mask)
        # model turn, observation, model turn, observation, model turn (none follows the last turn)
        assert [m for m, _ in runs] == [1, 0, 1, 0, 1]
        assert all(run == observation for m, run in runs if m == 0)
        assert all(lp == 0.0 for lp, m in zip(logps, mask, strict=True) if m == 0)
        assert all(lp < 0.0 for lp, m in zip(logps, mask, strict=True) if m == 1)
    # The environment saw exactly the model's turns, decoded from the ids kept in the episode
    # (the turns of the episodes are batched: turn t of every episode, then turn t + 1).
    per_turn = [[decode(engine.tokenizer, run) for m, run in segments(i, k) if m == 1][t]
                for t in range(3) for i, k in zip(result.response_ids, result.loss_mask, strict=True)]
    assert per_turn == list(actions)
    summary = summarize(result)
    assert summary["turns"] == 18 and summary["turns_max"] == 3
    assert summary["observation_tokens"] == 6 * 2 * len(observation)
    model_tokens = sum(sum(m) for m in result.loss_mask)
    assert summary["response_tokens"] == model_tokens, "rollout_tokens counts sampled tokens only"


def test_the_trainers_logprobs_of_the_model_tokens_equal_the_engines(engine):
    result = run_episodes(engine, ThreeTurns, env_spec(), 3, request(temperature=0.7))
    batch = collate(result, engine.tokenizer.pad_token_id)
    with torch.no_grad():
        logp = token_logprobs(forward_logits(engine.model, batch), batch, 0.7)
    mask = batch.response_mask.bool()
    assert mask.sum() == sum(sum(m) for m in result.loss_mask or [])
    assert (batch.response_mask.sum(-1) < batch.attention_mask[:, batch.prompt_len:].sum(-1)).all()
    torch.testing.assert_close(logp[mask], batch.behaviour_logp[mask], atol=2e-4, rtol=0)


class Tokens:
    """Done after each turn's observation would overflow: exercises maxTokens."""

    def __init__(self, record: dict[str, Any]): ...

    def reset(self) -> str:
        return ""

    def step(self, action: str) -> tuple[str | None, float, bool]:
        return " ok" * 20, 1.0, False


def test_an_episode_reaching_max_tokens_is_cut_there_and_counted_truncated(engine):
    result = run_episodes(engine, Tokens, env_spec(maxTokens=10), 4, request(samples=2))
    assert all(len(r) <= 10 for r in result.response_ids)
    assert result.truncated == [True] * 4 and result.finished == [False] * 4
    assert summarize(result)["episodes_truncated"] == 4


# -- faulty environments ---------------------------------------------------------------------


class Raises(ThreeTurns):
    def step(self, action: str) -> tuple[str | None, float, bool]:
        raise ConnectionError("sandbox refused the connection")


class Hangs(ThreeTurns):
    def step(self, action: str) -> tuple[str | None, float, bool]:
        time.sleep(30)
        return None, 1.0, True


class HangsAsync(ThreeTurns):
    async def step(self, action: str) -> tuple[str | None, float, bool]:  # type: ignore[override]  # async variant
        await asyncio.sleep(30)
        return None, 1.0, True


class Malformed(ThreeTurns):
    def step(self, action: str) -> Any:
        return "= 84", 1.0  # no done


class NotFinite(ThreeTurns):
    def step(self, action: str) -> tuple[str | None, float, bool]:
        return None, float("nan"), True


class BrokenInit(ThreeTurns):
    def __init__(self, record: dict[str, Any]):
        raise KeyError("answer")


class HalfBroken(ThreeTurns):
    """Fails the episodes of the first prompt only."""

    def step(self, action: str) -> tuple[str | None, float, bool]:
        if self.record["prompt"] == PROMPTS[0]:
            raise RuntimeError("tool crashed")
        return None, 1.0, True


FAULTS = [
    (Raises, "Raises.step() raised ConnectionError: sandbox refused the connection"),
    (Hangs, "Hangs.step() timed out after 0.5s"),
    (HangsAsync, "HangsAsync.step() timed out after 0.5s"),
    (Malformed, "Malformed.step() must return (observation: str | None, reward: float, done: bool), "
     "got ('= 84', 1.0)"),
    (NotFinite, "NotFinite.step() returned reward nan; expected a finite number"),
    (BrokenInit, "BrokenInit(record) raised KeyError: 'answer'"),
]


@pytest.mark.parametrize(("env_class", "error"), FAULTS, ids=[c.__name__ for c, _ in FAULTS])
def test_a_faulty_environment_fails_its_episodes_with_reward_zero_and_nothing_trained(
    engine, env_class, error
):
    started = time.monotonic()
    result = run_episodes(engine, env_class, env_spec(timeoutSeconds=0.5, maxFailedShare=1.0), 3, request())
    assert time.monotonic() - started < 10, "a hung environment must not hold the rollout"
    assert result.episode_errors == [error] * 6
    assert result.episode_rewards == [0.0] * 6
    assert all(sum(m) == 0 for m in result.loss_mask or [])
    summary = summarize(result)
    assert summary["episodes_failed"] == 6
    # Nothing is trained on, yet what the engine sampled is still counted as sampled, not observed.
    assert summary["response_tokens"] + summary["observation_tokens"] == sum(map(len, result.response_ids))
    assert summary["observation_tokens"] == sum(result.observation_tokens or [])


@pytest.mark.parametrize(("env_class", "error"), FAULTS, ids=[c.__name__ for c, _ in FAULTS])
def test_more_failed_episodes_than_max_failed_share_fail_the_rollout_naming_the_environment(
    engine, env_class, error
):
    with pytest.raises(EnvironmentFailed) as caught:
        run_episodes(engine, env_class, env_spec(timeoutSeconds=0.5, maxFailedShare=0.5), 3, request())
    assert str(caught.value) == (
        "spec.environment.class 'tests:Env': 6 of 6 episodes failed, more than maxFailedShare 0.5; "
        f"first error: {error}"
    )


def test_failures_within_max_failed_share_leave_the_other_episodes_scored(engine):
    result = run_episodes(engine, HalfBroken, env_spec(maxFailedShare=0.5), 3, request())
    assert result.episode_rewards == [0.0] * 3 + [1.0] * 3
    assert result.episode_errors == ["HalfBroken.step() raised RuntimeError: tool crashed"] * 3 + [None] * 3
