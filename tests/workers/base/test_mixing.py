"""Prompt mixing: the weighted shares, determinism under the seed, the per-source cap, exact resume
through a checkpoint's state, and errors naming the mix entry."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from kuberlhf.api import DataSpec
from kuberlhf_workers.base.data import PromptSampler, toy_prompts
from kuberlhf_workers.base.mixing import PromptMix, open_prompts
from kuberlhf_workers.control import checkpoint as ckpt

pytestmark = pytest.mark.unit


def _records(name: str, n: int) -> list[dict[str, str]]:
    return [{"prompt": f"{name}{i}", "source": name} for i in range(n)]


def _write(path: Path, name: str, n: int) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in _records(name, n)))


def _data(**kw: object) -> DataSpec:
    return DataSpec.model_validate(kw)


def test_each_source_gets_its_weights_share_of_many_draws() -> None:
    mix = PromptMix([(_records("a", 50), 0.7), (_records("b", 7), 0.2), (_records("c", 500), 0.1)], seed=3)
    drawn = [r["source"] for _ in range(500) for r in mix.next_batch(40)]
    shares = {name: count / len(drawn) for name, count in Counter(drawn).items()}
    # 20000 draws: one standard deviation of a share is at most 0.0035.
    assert shares == pytest.approx({"a": 0.7, "b": 0.2, "c": 0.1}, abs=0.015)


def test_weights_are_relative_and_need_not_sum_to_one() -> None:
    mix = PromptMix([(_records("a", 10), 3.0), (_records("b", 10), 1.0)], seed=0)
    drawn = Counter(r["source"] for _ in range(100) for r in mix.next_batch(100))
    assert drawn["a"] / 10_000 == pytest.approx(0.75, abs=0.02)


def test_a_batch_interleaves_the_sources_and_each_source_walks_whole_epochs() -> None:
    mix = PromptMix([(_records("a", 30), 1.0), (_records("b", 5), 1.0)], seed=11)
    batches = [mix.next_batch(8) for _ in range(50)]
    assert any(len({r["source"] for r in batch}) == 2 for batch in batches), "sources mixed within batches"
    from_b = [r["prompt"] for batch in batches for r in batch if r["source"] == "b"]
    epochs = [sorted(from_b[i : i + 5]) for i in range(0, len(from_b) - len(from_b) % 5, 5)]
    assert len(epochs) > 10 and all(epoch == [f"b{i}" for i in range(5)] for epoch in epochs)
    assert len({tuple(from_b[i : i + 5]) for i in range(0, 50, 5)}) > 1, "each epoch of b is reshuffled"


def test_the_mix_is_deterministic_under_the_seed() -> None:
    def stream(seed: int) -> list[str]:
        mix = PromptMix([(_records("a", 20), 0.5), (_records("b", 20), 0.5)], seed=seed)
        return [r["prompt"] for _ in range(10) for r in mix.next_batch(16)]

    assert stream(42) == stream(42)
    assert stream(42) != stream(43)


def test_a_resumed_mix_continues_exactly_through_a_checkpoints_state(tmp_path: Path) -> None:
    sources = [(_records("a", 13), 0.6), (_records("b", 4), 0.4)]
    unbroken = PromptMix(sources, seed=5)
    expected = [unbroken.next_batch(6) for _ in range(12)]

    first = PromptMix(sources, seed=5)
    before = [first.next_batch(6) for _ in range(7)]
    ckpt.write_state(tmp_path, ckpt.TrainingState(7, 12, first.state(), 5))
    resumed = PromptMix(sources, seed=5)
    resumed.load_state(ckpt.read_state(tmp_path).sampler)
    after = [resumed.next_batch(6) for _ in range(5)]
    assert before + after == expected
    assert resumed.state() == unbroken.state()


def test_a_mix_refuses_the_state_of_another_prompt_set() -> None:
    mix = PromptMix([(_records("a", 3), 1.0), (_records("b", 3), 1.0)], seed=0)
    single = PromptSampler(_records("a", 3), seed=0)
    with pytest.raises(ValueError, match=r"does not fit a mix of 2 prompt sources.*data\.promptMix"):
        mix.load_state(single.state())
    three = PromptMix([(_records("a", 3), 1.0)] * 3, seed=0)
    with pytest.raises(ValueError, match="does not fit a mix of 2"):
        mix.load_state(three.state())


def test_open_prompts_mixes_files_and_builtin_sources_each_capped_at_max_samples(tmp_path: Path) -> None:
    _write(tmp_path / "a.jsonl", "a", 100)
    mix_spec = [{"path": "a.jsonl", "weight": 1}, {"path": "builtin:toy", "weight": 1}]
    data = _data(promptMix=mix_spec, maxSamples=7)
    mix = open_prompts(data, tmp_path, seed=1)
    assert len(mix) == 14
    drawn = {r["prompt"] for _ in range(20) for r in mix.next_batch(10)}
    assert drawn == {f"a{i}" for i in range(7)} | {r["prompt"] for r in toy_prompts()[:7]}


def test_a_single_source_keeps_its_sampler_and_max_samples_takes_the_first_records(tmp_path: Path) -> None:
    _write(tmp_path / "p.jsonl", "p", 50)
    stream = open_prompts(_data(prompts="p.jsonl", maxSamples=5, shuffle=False), tmp_path, seed=0)
    assert isinstance(stream, PromptSampler) and set(stream.state()) == {"epoch", "position"}
    assert [r["prompt"] for r in stream.next_batch(7)] == ["p0", "p1", "p2", "p3", "p4", "p0", "p1"]


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("missing.jsonl", r"spec\.data\.promptMix\.1\.path: prompt file .*missing\.jsonl does not exist"),
        ("b.csv", r"spec\.data\.promptMix\.1\.path: unsupported prompt source 'b\.csv'"),
    ],
)
def test_a_bad_mix_entry_is_an_error_naming_it(tmp_path: Path, path: str, error: str) -> None:
    _write(tmp_path / "a.jsonl", "a", 3)
    data = _data(promptMix=[{"path": "a.jsonl", "weight": 1}, {"path": path, "weight": 1}])
    with pytest.raises(ValueError, match=error):
        open_prompts(data, tmp_path, seed=0)


def test_an_empty_mix_entry_names_it(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n")
    data = _data(promptMix=[{"path": "empty.jsonl", "weight": 1}])
    with pytest.raises(ValueError, match=r"spec\.data\.promptMix\.0\.path: .*empty\.jsonl holds no records"):
        open_prompts(data, tmp_path, seed=0)


def test_a_weight_that_is_not_positive_is_refused_naming_the_entry() -> None:
    with pytest.raises(ValueError, match=r"spec\.data\.promptMix\.1\.weight: must be greater than 0"):
        PromptMix([(_records("a", 3), 1.0), (_records("b", 3), 0.0)], seed=0)
