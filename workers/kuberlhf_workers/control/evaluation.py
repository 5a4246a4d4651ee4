"""Evaluation of an online run on held-out prompts (`spec.eval.prompts`): the rollout engines
sample `eval.samplesPerPrompt` completions per prompt, the reward workers score them, and the
step's metrics get `eval_reward_mean` and `eval_pass_at_k` (the share of prompts with at least
one sample scoring `eval.passThreshold` or more, k being the samples per prompt).

With spec.environment each sample is an episode: the same environment class, built from the eval
prompt's record, plays it out on the engines (at `eval.temperature`; 0 is greedy) and the
episode's reward is the sample's score, so there is no reward worker to ask. Failed episodes
score 0 and are counted in `eval_episodes_failed`; more than maxFailedShare of them fail the
evaluation as they would a training step."""

from __future__ import annotations

from typing import Any

from kuberlhf.api import RLHFJobSpec
from kuberlhf_workers.base.samples import GenerationRequest
from kuberlhf_workers.base.seeds import mix_seed
from kuberlhf_workers.control.faults import wait_all
from kuberlhf_workers.control.handles import RewardHandle, RolloutHandle
from kuberlhf_workers.control.rollout_queue import split_prompts
from kuberlhf_workers.rewards.sources import reward_budget_s

EVAL_SEED = 7919  # mixed into the seed so evaluation samples never repeat a training step's


def eval_requests(
    spec: RLHFJobSpec, step: int, records: list[dict[str, Any]], engines: int
) -> list[GenerationRequest]:
    """One request per engine, seeded by step (the same prompts are sampled afresh each time)."""
    return [
        GenerationRequest(
            prompts=[r["prompt"] for r in part],
            samples_per_prompt=spec.eval.samples_per_prompt,
            max_new_tokens=spec.data.max_new_tokens,
            temperature=spec.eval.temperature,
            top_p=spec.rollout.top_p,
            max_prompt_tokens=spec.data.max_prompt_tokens,
            seed=mix_seed(spec.seed, EVAL_SEED, step, i),
            records=tuple(part) if spec.environment is not None else (),
        )
        for i, part in enumerate(split_prompts(records, engines))
    ]


def eval_metrics(rewards: list[float], samples_per_prompt: int, threshold: float) -> dict[str, float]:
    """Mean reward and pass@k over rows grouped by prompt (k = samples_per_prompt)."""
    groups = [rewards[i : i + samples_per_prompt] for i in range(0, len(rewards), samples_per_prompt)]
    return {
        "eval_reward_mean": sum(rewards) / len(rewards),
        "eval_pass_at_k": sum(any(r >= threshold for r in g) for g in groups) / len(groups),
    }


def evaluate(
    spec: RLHFJobSpec,
    step: int,
    records: list[dict[str, Any]],
    rollouts: list[RolloutHandle],
    rewards: list[RewardHandle],
    timeout_s: float,
) -> dict[str, float]:
    """Generate on every engine, score on every reward replica (each its share), combine."""
    calls = [
        engine.rollout(r)
        for engine, r in zip(rollouts, eval_requests(spec, step, records, len(rollouts)), strict=False)
    ]
    summaries = wait_all(
        [(e.label, summary) for e, (summary, _) in zip(rollouts, calls, strict=False)],
        timeout_s,
        f"evaluation after step {step}",
        "raise spec.schedule.stepTimeoutSeconds",
    )
    refs = [result for _, result in calls]
    spp = spec.eval.samples_per_prompt
    if spec.environment is not None:
        results = wait_all(
            [(e.label, ref) for e, ref in zip(rollouts, refs, strict=False)],
            timeout_s,
            f"fetching the evaluation episodes after step {step}",
            "raise spec.schedule.stepTimeoutSeconds",
        )
        episode_rewards = [r for result in results for r in result.episode_rewards or []]
        failed = sum(s["episodes_failed"] for s in summaries)
        metrics = eval_metrics(episode_rewards, spp, spec.eval.pass_threshold)
        return {**metrics, "eval_episodes_failed": float(failed)}
    scored = wait_all(
        [(w.label, w.score(refs, records, spp, i, len(rewards))) for i, w in enumerate(rewards)],
        reward_budget_s(spec.online_reward(), len(records) * spp),
        f"scoring the evaluation after step {step}",
        "make the reward faster or raise spec.reward.timeoutSeconds",
    )
    return eval_metrics([r for part in scored for r in part], spp, spec.eval.pass_threshold)
