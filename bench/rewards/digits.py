"""The benchmark reward, loaded from this file by both kuberlhf and TRL: the share of digit
characters in a completion. A randomly initialised model emits few digits, so the curve has
room to climb, and the score is cheap enough that it never shows up in the timings."""


def reward(prompts: list[str], completions: list[str], **kw: object) -> list[float]:
    return [sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in completions]
