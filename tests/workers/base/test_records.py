"""Offline records become token ids with the prompt / response boundary where the losses need it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kuberlhf_workers.base.records import Renderer, Sequence, _truncate, example, load_examples

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_chat_records_train_on_exactly_what_the_template_adds_after_the_generation_prompt(
    tokenizer: Any,
) -> None:
    renderer = Renderer(tokenizer, None, 256)
    record = {
        "messages": [
            {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": "The answer is 5."},
        ]
    }
    seq = example(record, "sft", renderer, "r").chosen
    prompt = tokenizer.apply_chat_template(record["messages"][:1], add_generation_prompt=True, tokenize=False)
    assert tokenizer.decode(seq.prompt) == prompt
    assert tokenizer.decode(seq.response).strip() == f"The answer is 5.{tokenizer.eos_token}"


def test_plain_prompt_and_response_strings_end_the_response_with_eos(tokenizer: Any) -> None:
    renderer = Renderer(tokenizer, False, 256)
    seq = example({"prompt": "Count:", "response": " 1 2 3"}, "sft", renderer, "r").chosen
    assert seq.response[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(seq.response[:-1]) == " 1 2 3"


def test_preference_pairs_share_the_prompt_and_keep_the_margin(tokenizer: Any) -> None:
    renderer = Renderer(tokenizer, None, 256)
    ex = example(
        {"prompt": "Write:", "chosen": "12 34", "rejected": "the cat", "margin": 0.5}, "pairs", renderer, "r"
    )
    assert ex.rejected is not None and ex.chosen.prompt == ex.rejected.prompt
    assert ex.chosen.response != ex.rejected.response and ex.margin == 0.5


def test_long_records_lose_the_start_of_the_prompt_and_are_counted() -> None:
    cut, truncated = _truncate(Sequence(list(range(10)), [100, 101, 102, 103]), 8)
    assert truncated and cut.response == [100, 101, 102, 103] and cut.prompt == [6, 7, 8, 9]
    cut, _ = _truncate(Sequence([1, 2], list(range(20))), 8)
    assert len(cut.ids) == 8 and cut.prompt == [1, 2], "a long response keeps the whole short prompt"


@pytest.mark.parametrize(
    ("record", "kind", "needle"),
    [
        ({"prompt": "p"}, "sft", "missing response"),
        ({"prompt": "p", "chosen": "c"}, "pairs", "missing rejected"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "sft", "last message must be the assistant"),
        (
            {"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"},
            "pairs",
            "margin must be a finite",
        ),
        ({"prompt": [{"role": "user"}], "response": "r"}, "sft", "list of {role, content}"),
    ],
)
def test_a_bad_record_is_an_error_naming_where_it_is_and_what_it_lacks(
    tokenizer: Any, record: dict[str, Any], kind: Any, needle: str
) -> None:
    with pytest.raises(ValueError, match=r"spec\.data\.train: f\.jsonl record 3") as raised:
        example(record, kind, Renderer(tokenizer, None, 64), "spec.data.train: f.jsonl record 3")
    assert needle in str(raised.value)


def test_messages_without_a_chat_template_are_refused_naming_the_setting(tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="chatTemplate"):
        example(
            {"prompt": [{"role": "user", "content": "x"}], "response": "y"},
            "sft",
            Renderer(tokenizer, False, 64),
            "r",
        )


def test_a_file_with_a_broken_line_names_the_line(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n{oops\n")
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_examples(path, "spec.data.train", "sft", Renderer(tokenizer, None, 64))
    with pytest.raises(ValueError, match="does not exist"):
        load_examples(tmp_path / "nope.jsonl", "spec.data.train", "sft", Renderer(tokenizer, None, 64))


def test_online_prompt_records_of_chat_messages_become_the_templated_generation_prompt(
    tokenizer: Any, tmp_path: Path
) -> None:
    from kuberlhf.api import DataSpec
    from kuberlhf_workers.base.data import load_prompts
    from kuberlhf_workers.base.records import chat_prompt

    path = tmp_path / "prompts.jsonl"
    rows = [{"messages": [{"role": "user", "content": "Count to 3"}], "answer": "1 2 3"}, {"prompt": "plain"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = load_prompts(DataSpec(prompts=str(path)), tmp_path, lambda m: chat_prompt(tokenizer, m))
    assert records[0]["prompt"] == f"{tokenizer.bos_token}user: Count to 3{tokenizer.eos_token}assistant:"
    assert records[0]["answer"] == "1 2 3" and records[1]["prompt"] == "plain"
    with pytest.raises(ValueError, match=r"spec\.data\.chatTemplate: record 0"):
        load_prompts(DataSpec(prompts=str(path)), tmp_path, None)
