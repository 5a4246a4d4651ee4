"""What both sides of the TRL comparison share: the model, the tokenizer, the prompts, the reward.

Everything here is built once per benchmark run into one folder that both systems read, so
the two trainings start from byte-identical weights and see the same prompts. The builders
are seeded: two benchmark runs build the same model. Runs under either virtual environment
(.venv for kuberlhf, .venv-bench for TRL): only torch, transformers and tokenizers are used.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
WEIGHTS_FILE = "model.safetensors"
_WORD_TEXT = (
    "the a one two three four five six seven eight nine ten count number add plus minus sum answer "
    "what is are and or of to from in on with write say list next digit digits letter word story "
    "cat dog bird fish tree sun moon star red blue green small big fast slow happy sad yes no"
)
_WORDS = tuple(_WORD_TEXT.split())


@dataclass(frozen=True)
class BenchConfig:
    """The workload both systems run; every field is the same on both sides by construction."""

    steps: int = 20
    prompts_per_step: int = 8
    samples_per_prompt: int = 4
    max_new_tokens: int = 32
    learning_rate: float = 1e-3
    temperature: float = 1.0
    beta: float = 0.0
    seed: int = 42
    hidden_size: int = 512
    intermediate_size: int = 1024
    layers: int = 4
    heads: int = 8
    vocab_size: int = 512
    prompts: int = 256
    warmup_steps_excluded: int = 2

    @property
    def samples_per_step(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def corpus(seed: int, lines: int) -> list[str]:
    """Words, numbers and sums, so digits and common words become single tokens."""
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        if i % 3 == 0:
            out.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))))
        elif i % 3 == 1:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            out.append(f"What is {a} + {b}? The answer is {a + b}.")
        else:
            start = rng.randint(0, 50)
            out.append("Count: " + " ".join(str(n) for n in range(start, start + rng.randint(3, 9))))
    return out


def prompt_records(seed: int, count: int) -> list[dict[str, str]]:
    """Short instructions; the reward (share of digits) is learnable from any of them."""
    rng = random.Random(seed)
    templates = ("What is {a} + {b}?", "Count from {a} to {b}:", "Write {a} numbers:", "Say {w} {w2}.")
    records = []
    for i in range(count):
        a = rng.randint(0, 50)
        text = templates[i % len(templates)].format(
            a=a, b=a + rng.randint(2, 9), w=rng.choice(_WORDS), w2=rng.choice(_WORDS)
        )
        records.append({"prompt": text})
    return records


def write_prompts(path: Path, seed: int, count: int) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in prompt_records(seed, count)), encoding="utf-8")
    return path


def read_prompts(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def build_tokenizer(vocab_size: int, seed: int) -> Any:
    """A byte-level BPE trained here on a generated corpus (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(seed, 4000), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=512
    )


def build_model(dest: Path, config: BenchConfig) -> str:
    """Save a seeded Llama (fp32) and its tokenizer into `dest`; returns the weights' sha256."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = build_tokenizer(config.vocab_size, config.seed)
    llama = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.heads,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_config(llama, dtype=torch.float32)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return weights_sha256(dest)


def weights_sha256(model_dir: Path) -> str:
    digest = hashlib.sha256()
    with (model_dir / WEIGHTS_FILE).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parameter_count(model_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(model_dir / WEIGHTS_FILE), framework="pt") as fh:
        return sum(math.prod(fh.get_slice(name).get_shape()) for name in fh.keys())  # noqa: SIM118


def matmul_parameters(model_dir: Path) -> int:
    """Weights a token's forward multiplies by: every 2-D tensor but the input embedding (a lookup),
    plus the output projection once more when it is tied to that embedding (saved only once)."""
    from safetensors import safe_open

    config = json.loads((model_dir / "config.json").read_text())
    total, embedding, has_head = 0, 0, False
    with safe_open(str(model_dir / WEIGHTS_FILE), framework="pt") as fh:
        for name in fh.keys():  # noqa: SIM118
            shape = fh.get_slice(name).get_shape()
            if len(shape) != 2:
                continue
            if name.endswith("embed_tokens.weight"):
                embedding = math.prod(shape)
                continue
            has_head = has_head or name.endswith("lm_head.weight")
            total += math.prod(shape)
    return total + (embedding if config.get("tie_word_embeddings") and not has_head else 0)


def prompt_tokens_mean(model_dir: Path, prompts: Path, count: int) -> float:
    """Mean token count of the first `count` prompts (the ones the steps read, in file order)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [r["prompt"] for r in read_prompts(prompts)[:count]]
    return sum(len(tokenizer(text)["input_ids"]) for text in texts) / len(texts)


def relative_change(before: Path, after: Path) -> float:
    """||w_after - w_before|| / ||w_before|| over every tensor: evidence that training moved the
    weights at all, comparable between the two systems."""
    from safetensors.torch import load_file

    start, end = load_file(str(before / WEIGHTS_FILE)), load_file(str(after / WEIGHTS_FILE))
    # A trainer may save a tied output projection as a tensor of its own: only `before`'s count.
    if missing := sorted(start.keys() - end.keys()):
        raise ValueError(f"{after} lacks tensors {before} has: {missing}")
    moved = sum(float(((end[k].double() - start[k].double()) ** 2).sum()) for k in start)
    size = sum(float((start[k].double() ** 2).sum()) for k in start)
    return math.sqrt(moved / size)


def load_function(path: Path, name: str) -> Callable[..., Any]:
    """Import `name` from a Python file, the way kuberlhf loads "file.py:fn" rewards."""
    spec = importlib.util.spec_from_file_location(f"bench_reward_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"{path} defines no function {name!r}")
    return fn  # type: ignore[no-any-return]


def child_env(threads: int | None = None) -> dict[str, str]:
    """The environment every benchmarked child runs in: offline, no telemetry, unbuffered, and
    (when given) the same thread count for every library."""
    env = dict(os.environ)
    env.update(
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="disabled",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    else:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env

