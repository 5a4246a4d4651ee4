"""Neural reward models: scoring with a sequence-classification model, and a tiny one trained here.

No reward model ships offline, so tests and examples train a tiny LlamaForSequenceClassification
on a synthetic, checkable target (the share of digits in the completion) in a few seconds.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from kuberlhf.api import Precision
from kuberlhf_workers.base.precision import compute_dtype

_WORDS = ("the", "cat", "dog", "sun", "red", "blue", "one", "two", "yes", "no", "answer", "is", "and", "big")


def digit_share(text: str) -> float:
    """The synthetic reward: fraction of non-space characters that are digits."""
    chars = [c for c in text if not c.isspace()]
    return sum(c.isdigit() for c in chars) / len(chars) if chars else 0.0


def synthetic_completions(count: int, seed: int) -> list[str]:
    """Completions spanning the whole range, from all words to all digits."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        digit_prob = rng.random()
        pieces = [
            str(rng.randint(0, 999)) if rng.random() < digit_prob else rng.choice(_WORDS)
            for _ in range(rng.randint(2, 10))
        ]
        texts.append(" ".join(pieces))
    return texts


class RewardModelScorer:
    """Callable like a reward function: `(prompts, completions, **kw) -> list[float]`.

    `precision`: a job's spec.precision (the reward worker passes it). fp32 unless asked: a bf16
    score carries three significant digits and can move by one of them with the batch's padding."""

    def __init__(
        self, model_dir: str | Path, device: str = "cpu", batch_size: int = 32, precision: Precision = "fp32"
    ):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.device = torch.device(device)
        dtype = compute_dtype(precision, self.device)
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=dtype)
        self.model = model.to(self.device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"spec.reward.model: {model_dir} has {self.model.config.num_labels} labels; a reward model "
                "must be a sequence-classification model with num_labels=1 (one scalar score)"
            )
        self.model.config.pad_token_id = self.tokenizer.pad_token_id

    @torch.inference_mode()
    def __call__(self, prompts: list[str], completions: list[str], **kw: Any) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        scores: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            texts = [
                p + c
                for p, c in zip(
                    prompts[start : start + self.batch_size],
                    completions[start : start + self.batch_size],
                    strict=True,
                )
            ]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True).to(self.device)
            scores.extend(self.model(**enc).logits[:, 0].float().cpu().tolist())
        return scores


def train_tiny_reward_model(out_dir: str | Path, tokenizer_dir: str | Path, seed: int = 0) -> Path:
    """Train a ~0.1M-parameter reward model to predict `digit_share(completion)`; a few seconds on CPU."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    out = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = LlamaConfig(  # type: ignore[call-arg]  # num_labels is a PretrainedConfig kwarg
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config)
    completions = synthetic_completions(2048, seed)
    targets = torch.tensor([digit_share(c) for c in completions])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(3):
        for batch in torch.randperm(len(completions), generator=order).split(64):
            enc = tokenizer([completions[i] for i in batch], return_tensors="pt", padding=True)
            loss = torch.nn.functional.mse_loss(model(**enc).logits[:, 0], targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
