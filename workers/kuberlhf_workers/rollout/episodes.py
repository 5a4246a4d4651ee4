"""Multi-turn episodes: the loop between a rollout engine and `spec.environment`, token in, token out.

An episode is kept as token ids from start to end: the model's turns are the ids it sampled and
the observations are encoded once and appended, so no turn is ever re-tokenised (decoding and
re-encoding a context can merge or split tokens, and the trainer would then score ids the engine
never sampled). The model's tokens get loss mask 1 and their behaviour log-probs, the
observations' mask 0. An episode whose environment fails scores 0 and is not trained on at all
(the failure is the environment's, not the model's), nor does it enter its group's baseline
(training/algorithms.group_advantages leaves rows without trained tokens out); when more than
maxFailedShare of the episodes fail, the rollout fails naming the environment and the first error.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from kuberlhf.api import EnvironmentSpec
from kuberlhf_workers.base.environments import EpisodeFailed, call_all, checked_reset, checked_step
from kuberlhf_workers.base.samples import GenerationRequest, GenerationResult
from kuberlhf_workers.base.seeds import mix_seed

log = logging.getLogger("kuberlhf.environment")


@dataclass(frozen=True)
class Turn:
    """What the model sampled in one turn: the ids and their behaviour log-probs."""

    ids: list[int]
    logprobs: list[float]


@runtime_checkable
class TurnGenerator(Protocol):
    """A rollout backend that continues token contexts (what multi-turn episodes need)."""

    # The engine's transformers tokenizer: observations are encoded and turns decoded with it by
    # the functions below, the same way for every backend.
    tokenizer: Any

    def encode_prompt(self, text: str, max_tokens: int) -> list[int]:
        """The prompt's ids, as single-turn generation encodes it (cut from the left)."""
        ...

    def sample_turns(
        self, contexts: list[list[int]], max_new_tokens: list[int], request: GenerationRequest, seed: int
    ) -> list[Turn]:
        """One turn for each context, row i at most max_new_tokens[i] tokens, ending at EOS."""
        ...


def encode_observation(tokenizer: Any, text: str) -> list[int]:
    """An observation's ids, without special tokens: it continues the episode, it starts nothing."""
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def decode(tokenizer: Any, ids: list[int]) -> str:
    """Text of a model turn or an episode, without special tokens (what the environment reads)."""
    return str(tokenizer.decode(ids, skip_special_tokens=True))


class EnvironmentFailed(RuntimeError):
    """Too many of a rollout's episodes failed: the step cannot be trusted."""


@dataclass
class Episode:
    """One episode's bookkeeping; `response` interleaves model turns (mask 1) and observations (mask 0)."""

    prompt: list[int]
    response: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    reward: float = 0.0
    turns: int = 0
    observed: int = 0  # observation tokens in `response` (the mask cannot tell once an episode failed)
    done: bool = False
    truncated: bool = False
    error: str | None = None

    @property
    def open(self) -> bool:
        return not (self.done or self.truncated or self.error)

    def add_turn(self, turn: Turn) -> None:
        self.response += turn.ids
        self.mask += [1] * len(turn.ids)
        self.logprobs += turn.logprobs
        self.turns += 1

    def add_observation(self, ids: list[int], max_tokens: int) -> None:
        """Append an observation, cut at the episode's token limit (which then ends it, truncated)."""
        room = max_tokens - len(self.response)
        kept = ids[: max(room, 0)]
        self.response += kept
        self.mask += [0] * len(kept)
        self.logprobs += [0.0] * len(kept)
        self.observed += len(kept)
        if len(kept) < len(ids) or len(self.response) >= max_tokens:
            self.truncated = True

    def fail(self, error: str) -> None:
        self.error, self.reward = error, 0.0
        self.mask = [0] * len(self.mask)


def run_episodes(
    engine: TurnGenerator,
    env_class: Callable[[dict[str, Any]], Any],
    env_spec: EnvironmentSpec,
    max_turns: int,
    request: GenerationRequest,
) -> GenerationResult:
    """Play `samples_per_prompt` episodes per prompt, all open episodes' turns sampled together."""
    n = request.samples_per_prompt
    if len(request.records) != len(request.prompts):
        raise ValueError(f"{len(request.records)} records for {len(request.prompts)} prompts: environments "
                         "need each prompt's record")
    records = [r for r in request.records for _ in range(n)]
    prompts = [p for p in request.prompts for _ in range(n)]
    who = env_class.__name__
    timeout = env_spec.timeout_seconds
    envs = call_all([functools.partial(env_class, dict(r)) for r in records], timeout, f"{who}(record)")
    starts = call_all(
        [functools.partial(_failed, e) if isinstance(e, EpisodeFailed) else e.reset for e in envs],
        timeout,
        f"{who}.reset()",
    )
    episodes = []
    for prompt, start in zip(prompts, starts, strict=True):
        try:
            text = prompt + checked_reset(start, who)
            episodes.append(Episode(engine.encode_prompt(text, request.max_prompt_tokens)))
        except EpisodeFailed as exc:
            episodes.append(Episode(engine.encode_prompt(prompt, request.max_prompt_tokens)))
            episodes[-1].fail(str(exc))
    for turn in range(max_turns):
        live = [i for i, ep in enumerate(episodes) if ep.open]
        if not live:
            break
        budgets = [min(request.max_new_tokens, env_spec.max_tokens - len(episodes[i].response)) for i in live]
        contexts = [episodes[i].prompt + episodes[i].response for i in live]
        sampled = engine.sample_turns(contexts, budgets, request, mix_seed(request.seed, turn))
        for i, out in zip(live, sampled, strict=True):
            episodes[i].add_turn(out)
        actions = [decode(engine.tokenizer, out.ids) for out in sampled]
        steps = call_all(
            [functools.partial(envs[i].step, a) for i, a in zip(live, actions, strict=True)],
            timeout,
            f"{who}.step()",
        )
        for i, result in zip(live, steps, strict=True):
            ep = episodes[i]
            try:
                observation, reward, done = checked_step(result, who)
            except EpisodeFailed as exc:
                ep.fail(str(exc))
                continue
            ep.reward += reward
            ep.done = done
            if done or turn == max_turns - 1:  # no model turn follows: an observation would be dead weight
                continue
            if len(ep.response) >= env_spec.max_tokens:
                ep.truncated = True
            elif observation:
                ep.add_observation(encode_observation(engine.tokenizer, observation), env_spec.max_tokens)
    for ep in episodes:
        if ep.open:  # out of turns before the environment said done
            ep.truncated = True
    _check_failures(episodes, env_spec)
    return GenerationResult(
        prompts=prompts,
        responses=[decode(engine.tokenizer, ep.response) for ep in episodes],
        prompt_ids=[ep.prompt for ep in episodes],
        response_ids=[ep.response for ep in episodes],
        response_logprobs=[ep.logprobs for ep in episodes],
        finished=[ep.done for ep in episodes],
        loss_mask=[ep.mask for ep in episodes],
        episode_rewards=[ep.reward for ep in episodes],
        turns=[ep.turns for ep in episodes],
        truncated=[ep.truncated for ep in episodes],
        episode_errors=[ep.error for ep in episodes],
        observation_tokens=[ep.observed for ep in episodes],
    )


def _failed(error: EpisodeFailed) -> EpisodeFailed:
    """Stands in for the reset of an environment that could not be built."""
    return error


def _check_failures(episodes: list[Episode], env_spec: EnvironmentSpec) -> None:
    errors = [ep.error for ep in episodes if ep.error is not None]
    if errors:  # a few failed episodes do not stop training, so the log is where they show up
        log.warning("spec.environment.class %r: %d of %d episodes failed (reward 0, not trained on); "
                    "first error: %s", env_spec.class_, len(errors), len(episodes), errors[0])
    if errors and len(errors) > env_spec.max_failed_share * len(episodes):
        raise EnvironmentFailed(
            f"spec.environment.class {env_spec.class_!r}: {len(errors)} of {len(episodes)} episodes failed, "
            f"more than maxFailedShare {env_spec.max_failed_share:g}; first error: {errors[0]}"
        )
