"""Rule-based math reward: 1.0 when the last \\boxed{...} answer matches the reference.

Records carry the reference answer in the `answer` field; the driver passes dataset
columns other than the prompt as keyword lists.
"""

import re

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def _normalise(text: str) -> str:
    return text.strip().replace(" ", "").rstrip(".")


def reward(
    prompts: list[str], completions: list[str], answer: list[str] | None = None, **kw: object
) -> list[float]:
    answers = answer or [""] * len(completions)
    scores = []
    for completion, expected in zip(completions, answers, strict=True):
        found = _BOXED.findall(completion)
        scores.append(1.0 if found and _normalise(found[-1]) == _normalise(str(expected)) else 0.0)
    return scores
