"""Toy reward: the share of characters in a completion that are digits.

A tiny randomly initialised model emits digits rarely at first, so the mean reward
starts low and rises as the policy learns: an easy curve to watch.
"""


def reward(prompts: list[str], completions: list[str], **kw: object) -> list[float]:
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]
