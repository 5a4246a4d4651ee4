"""A model's shape without downloading it: for the memory estimate of `kuberlhf plan`.

Read, in order: the model's config.json when it is a local folder or already in the Hugging Face
cache; else the size its name states (`Qwen2.5-72B-Instruct`, `SmolLM2-135M`); else the spec's
`model.size` hint. The result says which, so a plan never hides a guess.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Source = Literal["config", "builtin", "name", "hint", "unknown"]
_SIZE = re.compile(r"(?:^|[-_/.\s])(\d+(?:\.\d+)?)\s*([bBmM])(?=$|[-_/.\s])")
_UNITS = {"b": 1e9, "m": 1e6}
# builtin:<name> models are built on first use; their shapes are fixed by their recipes.
BUILTIN_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "vocab_size": 512,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "tie_word_embeddings": False,
    },
    "smollm2-135m": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "vocab_size": 49152,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "tie_word_embeddings": True,
    },
}


@dataclass(frozen=True)
class ModelShape:
    """Parameter count and, when a config was read, the dimensions activations scale with."""

    parameters: float
    source: Source
    hidden: int | None = None
    layers: int | None = None
    vocab: int | None = None

    @property
    def known(self) -> bool:
        return self.source != "unknown"

    def describe(self) -> str:
        if not self.known:
            return "size unknown"
        amount = self.parameters
        text = f"{amount / 1e9:.3g}B" if amount >= 1e9 else f"{amount / 1e6:.3g}M"
        return f"{text} parameters (from {self.source})"


def parse_size(text: str) -> float | None:
    """`72B` / `0.5b` / `135M` anywhere in a name, as a parameter count; None when absent."""
    found = _SIZE.findall(text)
    if not found:
        return None
    number, unit = found[-1]  # the last one: "Llama-3-8B" of "org/Llama-3-8B-Instruct"
    return float(number) * _UNITS[unit.lower()]


def parameters_of(config: dict[str, Any]) -> float:
    """Parameters of a decoder-only transformer from its config (Llama / Qwen2 / Mistral style)."""
    h, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    heads = config.get("num_attention_heads") or 1
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or h // heads
    inter = config.get("intermediate_size") or 4 * h
    attention = h * heads * head_dim * 2 + h * kv_heads * head_dim * 2
    mlp = 3 * h * inter
    embeddings = vocab * h * (1 if config.get("tie_word_embeddings") else 2)
    return float(embeddings + layers * (attention + mlp + 2 * h) + h)


def shape_of_config(config: dict[str, Any], source: Source) -> ModelShape:
    return ModelShape(
        parameters_of(config),
        source,
        config["hidden_size"],
        config["num_hidden_layers"],
        config["vocab_size"],
    )


def _cached_config(ref: str) -> Path | None:
    """config.json of a hub id in the local Hugging Face cache (no network)."""
    hub = os.environ.get("HF_HUB_CACHE") or str(
        Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub"
    )
    snapshots = Path(hub).expanduser() / f"models--{ref.replace('/', '--')}" / "snapshots"
    found = sorted(snapshots.glob("*/config.json")) if snapshots.is_dir() else []
    return found[-1] if found else None


def model_config(ref: str, *, read_files: bool = True) -> tuple[dict[str, Any], Source] | None:
    """`ref`'s config as a dict without loading weights: a builtin's recipe, else (with
    `read_files`) a local folder's or the Hugging Face cache's config.json; None when neither."""
    if ref.startswith("builtin:") and ref.removeprefix("builtin:") in BUILTIN_SHAPES:
        return BUILTIN_SHAPES[ref.removeprefix("builtin:")], "builtin"
    if read_files:
        local = Path(ref).expanduser() / "config.json"
        config_file = local if local.is_file() else (_cached_config(ref) if "/" in ref else None)
        if config_file is not None:
            try:
                config = json.loads(config_file.read_text())
            except (OSError, ValueError):
                return None
            return (config, "config") if isinstance(config, dict) else None
    return None


def head_size(config: dict[str, Any]) -> int | None:
    """Attention head size of a decoder config (what vLLM's CPU kernels are built for)."""
    heads = config.get("num_attention_heads") or 1
    size = config.get("head_dim") or config.get("hidden_size", 0) // heads
    return int(size) or None


def model_shape(ref: str, hint: str | None = None, *, read_files: bool = True) -> ModelShape:
    """The best shape knowable for `ref` here. `read_files=False` (the operator, which has no model
    files) uses only the name and the hint."""
    found = model_config(ref, read_files=read_files)
    if found is not None:
        try:
            return shape_of_config(*found)
        except KeyError:
            pass  # not a decoder config we can read: fall back to the name
    named = parse_size(Path(ref).name or ref)
    if named is not None:
        return ModelShape(named, "name")
    hinted = parse_size(hint) if hint else None
    if hinted is not None:
        return ModelShape(hinted, "hint")
    return ModelShape(0.0, "unknown")
