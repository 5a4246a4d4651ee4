"""Prompt loading from every supported source, and the sampler's determinism and exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kuberlhf.api import DataSpec
from kuberlhf_workers.base.data import PromptSampler, load_prompts

pytestmark = pytest.mark.unit


def _spec(prompts: str, **kw: object) -> DataSpec:
    return DataSpec.model_validate({"prompts": prompts, **kw})


def test_builtin_toy_is_deterministic_and_has_answers(tmp_path: Path) -> None:
    first = load_prompts(_spec("builtin:toy"), tmp_path)
    assert first == load_prompts(_spec("builtin:toy"), tmp_path)
    assert 200 <= len(first) <= 1000
    assert len({r["prompt"] for r in first}) > len(first) // 2
    sums = [r for r in first if r["prompt"].startswith("What is") and "+" in r["prompt"]]
    a, b = (int(x) for x in sums[0]["prompt"].removeprefix("What is ").rstrip("?").split(" + "))
    assert sums[0]["answer"] == str(a + b)


def test_jsonl_relative_to_spec_dir_keeps_extra_columns(tmp_path: Path) -> None:
    lines = [{"question": "2+2?", "answer": "4"}, {"question": "3+3?", "answer": "6", "level": 2}]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "p.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    records = load_prompts(_spec("data/p.jsonl", promptKey="question"), tmp_path)
    assert records == [{"prompt": "2+2?", "answer": "4"}, {"prompt": "3+3?", "answer": "6", "level": 2}]


def test_parquet_is_loaded(tmp_path: Path) -> None:
    table = pa.table({"prompt": ["hello", "world"], "answer": ["1", "2"]})
    pq.write_table(table, tmp_path / "p.parquet")
    records = load_prompts(_spec(str(tmp_path / "p.parquet")), Path("/elsewhere"))
    assert records == [{"prompt": "hello", "answer": "1"}, {"prompt": "world", "answer": "2"}]


def test_unsupported_source_names_field_and_choices(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"spec\.data\.prompts: unsupported .*'prompts\.csv'.*builtin:toy.*jsonl"
    ):
        load_prompts(_spec("prompts.csv"), tmp_path)


def test_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"spec\.data\.prompts: prompt file .*nope\.jsonl does not exist"):
        load_prompts(_spec("nope.jsonl"), tmp_path)


def test_bad_jsonl_line_is_reported_with_its_number(tmp_path: Path) -> None:
    (tmp_path / "p.jsonl").write_text('{"prompt": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match=r"line 2 is not valid JSON"):
        load_prompts(_spec("p.jsonl"), tmp_path)
    (tmp_path / "p.jsonl").write_text('["a list"]\n')
    with pytest.raises(ValueError, match=r"line 1 must be a JSON object"):
        load_prompts(_spec("p.jsonl"), tmp_path)


def test_record_without_prompt_key_names_prompt_key(tmp_path: Path) -> None:
    (tmp_path / "p.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt here"}\n')
    with pytest.raises(ValueError, match=r"spec\.data\.promptKey: record 1 .*'prompt'.*\['text'\]"):
        load_prompts(_spec("p.jsonl"), tmp_path)


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "p.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"holds no records"):
        load_prompts(_spec("p.jsonl"), tmp_path)


def test_corrupt_parquet_is_reported(tmp_path: Path) -> None:
    (tmp_path / "p.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"spec\.data\.prompts: cannot read .* as parquet"):
        load_prompts(_spec("p.parquet"), tmp_path)


RECORDS = [{"prompt": str(i)} for i in range(10)]


def _ids(batch: list[dict]) -> list[int]:
    return [int(r["prompt"]) for r in batch]


def test_sampler_epochs_are_permutations_that_wrap_without_running_dry() -> None:
    sampler = PromptSampler(RECORDS, seed=1)
    first = _ids(sampler.next_batch(4)) + _ids(sampler.next_batch(4))
    crossing = _ids(sampler.next_batch(4))  # 2 from epoch 0, 2 from epoch 1
    assert sorted(first + crossing[:2]) == list(range(10))
    assert sampler.state() == {"epoch": 1, "position": 2}
    rest = _ids(sampler.next_batch(8))
    assert sorted(crossing[2:] + rest) == list(range(10))
    assert first + crossing[:2] != crossing[2:] + rest  # each epoch has its own order
    assert len(sampler.next_batch(25)) == 25  # larger than the data set


def test_sampler_is_deterministic_per_seed() -> None:
    a, b, c = PromptSampler(RECORDS, seed=7), PromptSampler(RECORDS, seed=7), PromptSampler(RECORDS, seed=8)
    seq_a, seq_b, seq_c = (_ids(s.next_batch(30)) for s in (a, b, c))
    assert seq_a == seq_b
    assert seq_a != seq_c


def test_sampler_without_shuffle_keeps_file_order() -> None:
    sampler = PromptSampler(RECORDS, seed=3, shuffle=False)
    assert _ids(sampler.next_batch(13)) == [*range(10), 0, 1, 2]


def test_sampler_resume_continues_exactly() -> None:
    original = PromptSampler(RECORDS, seed=5)
    original.next_batch(7)
    original.next_batch(7)
    saved = json.loads(json.dumps(original.state()))  # survives a checkpoint file
    expected = [_ids(original.next_batch(6)) for _ in range(4)]
    resumed = PromptSampler(RECORDS, seed=5)
    resumed.load_state(saved)
    assert [_ids(resumed.next_batch(6)) for _ in range(4)] == expected


def test_sampler_rejects_state_from_another_dataset() -> None:
    sampler = PromptSampler(RECORDS, seed=5)
    with pytest.raises(ValueError, match="does not fit 10 prompts"):
        sampler.load_state({"epoch": 0, "position": 11})
    with pytest.raises(ValueError, match="no prompts"):
        PromptSampler([], seed=0)
