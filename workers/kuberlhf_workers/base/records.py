"""Offline datasets (sft, rm, dpo): JSONL records in, token ids out.

Records are rendered once, on the driver, and the trainers receive token ids: every rank sees
the same tokens, and the prompt / response boundary (which decides which tokens a loss counts)
is fixed in one place. Chat messages go through the tokenizer's chat template; the response is
whatever the template adds after the generation prompt, so the model learns the exact tokens it
will be asked to continue at rollout time.

    sft:      {"messages": [..., {"role": "assistant", ...}]}  or  {"prompt": ..., "response": ...}
    rm, dpo:  {"prompt": ..., "chosen": ..., "rejected": ...}   (rm may add "margin": number)

Prompts and responses are strings or lists of {"role", "content"} messages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kuberlhf_workers.base.data import read_jsonl

Message = dict[str, str]
Text = str | list[Message]
Kind = Literal["sft", "pairs"]


@dataclass(frozen=True)
class Sequence:
    """A prompt and the response a loss is taken on, as token ids."""

    prompt: list[int]
    response: list[int]

    @property
    def ids(self) -> list[int]:
        return self.prompt + self.response


@dataclass(frozen=True)
class Example:
    """One training record: an SFT sequence, or a preference pair sharing one prompt."""

    chosen: Sequence
    rejected: Sequence | None = None  # None for sft
    margin: float | None = None  # rm: how much better chosen is, if the data says
    truncated: bool = False


def read_records(path: Path, field: str) -> list[dict[str, Any]]:
    """The JSON objects of a .jsonl file, with the line number of the first bad one."""
    if path.suffix.lower() != ".jsonl":
        raise ValueError(f"{field}: {path} must be a .jsonl file (one JSON object per line)")
    if not path.is_file():
        raise ValueError(f"{field}: {path} does not exist (relative paths start at the spec's folder)")
    records = read_jsonl(path, field)
    if not records:
        raise ValueError(f"{field}: {path} holds no records")
    return records


class Renderer:
    """Turns prompts and responses into token ids with one tokenizer, templated or plain."""

    def __init__(self, tokenizer: Any, chat_template: bool | None, max_length: int):
        self.tokenizer = tokenizer
        self.chat = chat_enabled(tokenizer, chat_template)
        self.max_length = max_length

    def _encode(self, text: str, special: bool) -> list[int]:
        ids: list[int] = self.tokenizer(text, add_special_tokens=special)["input_ids"]
        return ids

    def sequence(self, prompt: Text, response: Text, where: str) -> tuple[Sequence, bool]:
        """(tokens, whether they were cut to max_length)."""
        if self.chat:
            conversation = _messages(prompt, "user", where)
            prompt_text = self.tokenizer.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=False
            )
            full_text = self.tokenizer.apply_chat_template(
                conversation + _messages(response, "assistant", where), tokenize=False
            )
            if not full_text.startswith(prompt_text):
                raise ValueError(
                    f"{where}: the chat template renders the reply so that it does not continue the "
                    "generation prompt; set spec.data.chatTemplate: false and give plain strings"
                )
            seq = Sequence(
                self._encode(prompt_text, False), self._encode(full_text[len(prompt_text) :], False)
            )
        else:
            if not isinstance(prompt, str) or not isinstance(response, str):
                raise ValueError(
                    f"{where}: chat messages need a chat template, and spec.data.chatTemplate is off "
                    "(or the tokenizer has none); give the prompt and response as strings"
                )
            eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
            seq = Sequence(self._encode(prompt, True), self._encode(response, False) + eos)
        return _truncate(seq, self.max_length)


def chat_prompt(tokenizer: Any, messages: Any, where: str = "spec.data.prompts") -> str:
    """An online prompt record's messages as the text a rollout engine continues: the template up
    to the generation prompt, without a BOS the tokenizer will add again itself."""
    text: str = tokenizer.apply_chat_template(
        _messages(messages, "user", where), add_generation_prompt=True, tokenize=False
    )
    bos = tokenizer.bos_token
    adds_bos = bos is not None and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
    return text[len(bos) :] if adds_bos and text.startswith(bos) else text


def chat_enabled(tokenizer: Any, setting: bool | None) -> bool:
    """spec.data.chatTemplate resolved: its value, else whether the tokenizer has a template."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if setting and not has_template:
        raise ValueError("spec.data.chatTemplate: the tokenizer has no chat template; set it to false")
    return has_template if setting is None else setting


def _messages(value: Any, role: str, where: str) -> list[Message]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if (
        isinstance(value, list)
        and value
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value
        )
    ):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise ValueError(f"{where}: expected a string or a list of {{role, content}} messages, got {value!r:.80}")


def _truncate(seq: Sequence, limit: int) -> tuple[Sequence, bool]:
    """Cut to `limit` tokens: the response keeps at least half of them, the prompt loses its start
    (the end of a prompt is what the response answers)."""
    if len(seq.ids) <= limit:
        return seq, False
    response = seq.response[: max(limit // 2, limit - len(seq.prompt))]
    prompt = seq.prompt[len(seq.prompt) - (limit - len(response)) :] if limit > len(response) else []
    return Sequence(prompt, response), True


def example(record: dict[str, Any], kind: Kind, renderer: Renderer, where: str) -> Example:
    """One record as token ids; `where` names the file and line for errors."""
    if kind == "sft":
        if "messages" in record:
            messages = _messages(record["messages"], "user", where)
            if messages[-1]["role"] != "assistant":
                raise ValueError(f"{where}: the last message must be the assistant's reply to train on")
            seq, cut = renderer.sequence(messages[:-1] or "", [messages[-1]], where)
            return Example(seq, truncated=cut)
        _require(
            record, ("prompt", "response"), where, 'sft records hold "messages" or "prompt" and "response"'
        )
        seq, cut = renderer.sequence(record["prompt"], record["response"], where)
        return Example(seq, truncated=cut)
    _require(
        record,
        ("prompt", "chosen", "rejected"),
        where,
        'preference records hold "prompt", "chosen" and "rejected"',
    )
    chosen, cut_c = renderer.sequence(record["prompt"], record["chosen"], where)
    rejected, cut_r = renderer.sequence(record["prompt"], record["rejected"], where)
    margin = record.get("margin")
    if margin is not None and (not isinstance(margin, int | float) or not math.isfinite(margin)):
        raise ValueError(f"{where}: margin must be a finite number, got {margin!r:.40}")
    return Example(chosen, rejected, None if margin is None else float(margin), cut_c or cut_r)


def _require(record: dict[str, Any], keys: tuple[str, ...], where: str, what: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)} ({what}; this one has {sorted(record)})")


def load_examples(path: Path, field: str, kind: Kind, renderer: Renderer) -> list[Example]:
    records = read_records(path, field)
    return [example(r, kind, renderer, f"{field}: {path} record {i + 1}") for i, r in enumerate(records)]
