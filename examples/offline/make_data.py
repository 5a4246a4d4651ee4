"""Writes the tiny offline datasets beside this file (deterministic; run it to regenerate them).

    python examples/offline/make_data.py

sft-*.jsonl:   chat records that answer small sums ("What is 12 + 7?" -> "The answer is 19.").
prefs-*.jsonl: preference pairs in which the reply with more digits is chosen: the preference
               the digits reward of tiny-grpo.yaml encodes, so a reward model trained on them
               can stand in for that function. Prompts alternate between strings and messages.
grpo-prompts.jsonl: prompts of the same kind as chat messages, for the RL stage of
               examples/pipeline (the chat template renders them as the reward model saw them).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = [
    "the",
    "a",
    "one",
    "two",
    "cat",
    "dog",
    "sun",
    "moon",
    "red",
    "blue",
    "small",
    "big",
    "yes",
    "no",
    "good",
    "bad",
    "more",
    "less",
    "first",
    "last",
]
HERE = Path(__file__).resolve().parent


def sft_record(rng: random.Random) -> dict[str, object]:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return {
        "messages": [
            {"role": "user", "content": f"What is {a} + {b}?"},
            {"role": "assistant", "content": f"The answer is {a + b}."},
        ]
    }


def reply(rng: random.Random, digit_share: float) -> str:
    pieces = [
        str(rng.randint(0, 999)) if rng.random() < digit_share else rng.choice(WORDS)
        for _ in range(rng.randint(3, 8))
    ]
    return " ".join(pieces)


def pref_record(rng: random.Random, index: int) -> dict[str, object]:
    text = "Write " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3))) + ":"
    prompt: object = text if index % 2 else [{"role": "user", "content": text}]
    chosen, rejected = reply(rng, rng.uniform(0.6, 1.0)), reply(rng, rng.uniform(0.0, 0.3))
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def write(name: str, records: list[dict[str, object]]) -> None:
    (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def main() -> None:
    rng = random.Random(0)
    write("sft-train.jsonl", [sft_record(rng) for _ in range(512)])
    write("sft-eval.jsonl", [sft_record(rng) for _ in range(64)])
    write("prefs-train.jsonl", [pref_record(rng, i) for i in range(512)])
    write("prefs-eval.jsonl", [pref_record(rng, i) for i in range(64)])
    write("grpo-prompts.jsonl", [{"messages": pref_record(rng, 0)["prompt"]} for _ in range(256)])


if __name__ == "__main__":
    main()
