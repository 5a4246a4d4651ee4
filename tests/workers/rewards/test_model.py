"""The tiny reward model learns its synthetic target, and the scorer rejects unusable models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

from kuberlhf_workers.rewards.model import (
    RewardModelScorer,
    digit_share,
    synthetic_completions,
    train_tiny_reward_model,
)


@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_reward_model(tmp_path_factory.mktemp("rm"), tiny_model_dir, seed=0)


def test_digit_share_counts_non_space_characters() -> None:
    assert digit_share("12 ab") == 0.5
    assert digit_share("   ") == 0.0


def test_tiny_reward_model_ranks_held_out_completions_by_digit_share(reward_model_dir: Path) -> None:
    scorer = RewardModelScorer(reward_model_dir, batch_size=7)
    held_out = synthetic_completions(120, seed=1234)
    scores = torch.tensor(scorer(["Answer: "] * len(held_out), held_out))
    targets = torch.tensor([digit_share(c) for c in held_out])
    assert torch.corrcoef(torch.stack([scores, targets]))[0, 1] > 0.9
    high, low = scorer(["Q: ", "Q: "], ["12 345 6789 10", "the cat and the dog"])
    assert high - low > 0.5


def test_scores_do_not_depend_on_batching(reward_model_dir: Path) -> None:
    texts = synthetic_completions(10, seed=5)
    one_by_one = RewardModelScorer(reward_model_dir, batch_size=1)(["p"] * 10, texts)
    batched = RewardModelScorer(reward_model_dir, batch_size=10)(["p"] * 10, texts)
    assert torch.allclose(torch.tensor(one_by_one), torch.tensor(batched), atol=1e-4)


def test_scorer_rejects_a_classifier_with_several_labels(tiny_model_dir: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_labels=3,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"spec\.reward\.model: .* 3 labels.*num_labels=1"):
        RewardModelScorer(tmp_path)


def test_scorer_rejects_mismatched_lengths(reward_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        RewardModelScorer(reward_model_dir)(["a", "b"], ["c"])
