"""Prompt data: loading records from the sources a spec may name, and a resumable sampler.

Every record is a dict with the prompt text under "prompt" (whatever `promptKey` the source
uses) plus the source's other columns, which reach the reward function as keyword lists. A
record may instead hold chat `messages`: the tokenizer's chat template renders them into the
prompt text, ending in the generation prompt.
The sampler's whole position is two integers, so a checkpoint resumes the exact prompt order
(losing the dataloader state on resume is a classic RLHF bug).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from kuberlhf.api import DataSpec
from kuberlhf.files import find_spec_file
from kuberlhf_workers.base.seeds import mix_seed

FIELD = "spec.data.prompts"
ALLOWED = "builtin:toy, a .jsonl file or a .parquet file (relative to the spec file)"
TOY_SIZE = 320


def toy_prompts(seed: int = 0, size: int = TOY_SIZE) -> list[dict[str, Any]]:
    """Short tasks a tiny model can learn from, each with a reference `answer`."""
    rng = random.Random(seed)
    records: list[dict[str, Any]] = []
    for i in range(size):
        kind = i % 4
        if kind == 0:
            a, b = rng.randint(0, 50), rng.randint(0, 50)
            records.append({"prompt": f"What is {a} + {b}?", "answer": str(a + b)})
        elif kind == 1:
            start = rng.randint(0, 20)
            stop = start + rng.randint(2, 6)
            answer = " ".join(str(n) for n in range(start, stop + 1))
            records.append({"prompt": f"Count from {start} to {stop}:", "answer": answer})
        elif kind == 2:
            n = rng.randint(2, 9)
            records.append({"prompt": f"Write {n} digits:", "answer": "".join(str(d) for d in range(n))})
        else:
            a, b = rng.randint(10, 60), rng.randint(0, 9)
            records.append({"prompt": f"What is {a} minus {b}?", "answer": str(a - b)})
    return records


def read_jsonl(path: Path, field: str = FIELD, limit: int | None = None) -> list[dict[str, Any]]:
    """The JSON objects of a .jsonl file (the first `limit`: the rest is not read); a bad line is an
    error naming `field`, the file and the line."""
    records: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if limit is not None and len(records) == limit:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{field}: {path} line {number} is not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{field}: {path} line {number} must be a JSON object, got {record!r:.60}")
            records.append(record)
    return records


def _read_parquet(path: Path, field: str = FIELD, limit: int | None = None) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
        records: list[dict[str, Any]] = (table if limit is None else table.slice(0, limit)).to_pylist()
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise ValueError(f"{field}: cannot read {path} as parquet ({exc})") from None
    return records


def _normalise(
    records: list[dict[str, Any]],
    key: str,
    source: str,
    chat: Callable[[Any], str] | None,
    field: str = FIELD,
) -> list[dict[str, Any]]:
    """Move the prompt under "prompt" and reject records without usable prompt text."""
    out = []
    for index, record in enumerate(records):
        if key not in record and "messages" in record:
            if chat is None:
                raise ValueError(
                    f"spec.data.chatTemplate: record {index} of {source} holds chat messages, but the chat "
                    "template is off (or the tokenizer has none); give prompts as text under promptKey"
                )
            record = {**record, key: chat(record["messages"])}
        text = record.get(key)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(
                f"spec.data.promptKey: record {index} of {source} has no non-empty string under {key!r} "
                f"(its fields: {sorted(record)}); set promptKey to the field holding the prompt"
            )
        rest = {k: v for k, v in record.items() if k != key}
        out.append({**rest, "prompt": text})
    if not out:
        raise ValueError(f"{field}: {source} holds no records")
    return out


def load_source(
    source: str,
    prompt_key: str,
    spec_dir: Path,
    chat: Callable[[Any], str] | None = None,
    field: str = FIELD,
    max_samples: int | None = None,
) -> list[dict[str, Any]]:
    """Read the prompt records of one source (`field` names it in errors); the first `max_samples`
    in file order when set. A relative path is found next to the spec file, else on sys.path (in a
    cluster the spec is a ConfigMap mount and the image carries the data), as data.train is.
    `chat` renders a record's `messages` into prompt text (None: chat templates are off)."""
    if source == "builtin:toy":
        return toy_prompts()[:max_samples]
    suffix = Path(source).suffix.lower()
    if suffix not in (".jsonl", ".parquet"):
        raise ValueError(f"{field}: unsupported prompt source {source!r}; use {ALLOWED}")
    path = find_spec_file(Path(source).expanduser(), spec_dir)
    if path is None:
        missing = Path(source).expanduser()
        missing = missing if missing.is_absolute() else spec_dir / missing
        raise ValueError(
            f"{field}: prompt file {missing} does not exist (relative paths start at {spec_dir})"
        )
    read = read_jsonl if suffix == ".jsonl" else _read_parquet
    return _normalise(read(path, field, max_samples), prompt_key, str(path), chat, field)


def load_prompts(
    data: DataSpec, spec_dir: Path, chat: Callable[[Any], str] | None = None
) -> list[dict[str, Any]]:
    """Every prompt record of `data.prompts`, capped at `data.maxSamples`."""
    return load_source(data.prompts, data.prompt_key, spec_dir, chat, FIELD, data.max_samples)


class PromptStream(Protocol):
    """What the driver draws prompts from: one source (PromptSampler) or a weighted mix
    (base/mixing.PromptMix). Its whole position is a dict of integers, saved in every checkpoint."""

    def __len__(self) -> int: ...

    def next_batch(self, n: int) -> list[dict[str, Any]]: ...

    def state(self) -> dict[str, int]: ...

    def load_state(self, state: dict[str, int]) -> None: ...


class PromptSampler:
    """Endless, seeded, epoch-wise prompt order: a batch that crosses the end of an epoch continues
    into the next one, so training never runs dry and never stops early at an epoch boundary."""

    def __init__(self, records: list[dict[str, Any]], seed: int, shuffle: bool = True):
        if not records:
            raise ValueError(f"{FIELD}: no prompts to sample from")
        self._records = records
        self._seed = seed
        self._shuffle = shuffle
        self._epoch = 0
        self._position = 0
        self._order = self._epoch_order(0)

    def __len__(self) -> int:
        return len(self._records)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self._records)))
        if self._shuffle:
            random.Random(mix_seed(self._seed, epoch)).shuffle(order)
        return order

    def next_batch(self, n: int) -> list[dict[str, Any]]:
        if n < 1:
            raise ValueError(f"batch size must be at least 1, got {n}")
        batch: list[dict[str, Any]] = []
        while len(batch) < n:
            if self._position == len(self._order):
                self._epoch += 1
                self._position = 0
                self._order = self._epoch_order(self._epoch)
            take = min(n - len(batch), len(self._order) - self._position)
            batch.extend(self._records[i] for i in self._order[self._position : self._position + take])
            self._position += take
        return batch

    def state(self) -> dict[str, int]:
        return {"epoch": self._epoch, "position": self._position}

    def load_state(self, state: dict[str, int]) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self._records):
            raise ValueError(
                f"sampler state {state} does not fit {len(self._records)} prompts "
                "(was the checkpoint made with a different prompt set?)"
            )
        self._epoch, self._position = epoch, position
        self._order = self._epoch_order(epoch)
