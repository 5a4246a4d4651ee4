"""LoRA on the actor (peft): build the adapted model, and give its weights back in base-model form.

Only the adapters train, so the rollout engines (which hold the base model) need only the weights
LoRA changes, merged (W + B @ A * alpha / rank), under the base model's own names. Exports and the
weight sync both read the model through `sync_weights` / `export_weights`: a name, the parameters
to gather under ZeRO, and how to make the tensor from them once gathered.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from kuberlhf.api import LoraSpec

PEFT_PREFIX = "base_model.model."
# How a gathered parameter is read: its module data, or (exports) its fp32 master copy.
Reader = Callable[[torch.nn.Parameter], torch.Tensor]
# A base-model name, the parameters it is computed from, and the computation (run once gathered,
# given the reader).
OutWeight = tuple[list[torch.nn.Parameter], Callable[[Reader], torch.Tensor]]


def with_lora(build: Callable[[], torch.nn.Module], spec: LoraSpec | None) -> Callable[[], torch.nn.Module]:
    """The builder DeepSpeedRank.join calls: the plain model, or it wrapped in adapters."""
    if spec is None:
        return build
    return lambda: apply_lora(build(), spec)


def apply_lora(model: torch.nn.Module, spec: LoraSpec) -> torch.nn.Module:
    """`model` with adapters on `spec.target_modules`; every base weight frozen."""
    from peft import LoraConfig, get_peft_model

    targets: str | list[str] = "all-linear" if spec.target_modules == ["all-linear"] else spec.target_modules
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,  # type: ignore[arg-type]  # typed int, used as a float scale
        lora_dropout=spec.dropout,
        target_modules=targets,
    )
    peft_model: torch.nn.Module = get_peft_model(model, config)
    # Gradient checkpointing re-runs frozen embeddings whose outputs need grad for the adapters.
    peft_model.enable_input_require_grads()  # type: ignore[operator]
    return peft_model


def is_lora(module: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(module, PeftModel)


def base_model(module: torch.nn.Module) -> Any:
    """The transformers model under the adapters (config, generation config, save_pretrained)."""
    return module.base_model.model if is_lora(module) else module  # type: ignore[union-attr]


def base_name(name: str) -> str:
    """A peft parameter or module name as the base model names it."""
    return name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")


def is_adapter(name: str) -> bool:
    return any(f".{part}." in name for part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"))


def lora_layers(module: torch.nn.Module) -> dict[str, Any]:
    """The adapted layers by the base-model name of the weight they change."""
    from peft.tuners.lora import LoraLayer

    return {
        f"{base_name(name)}.weight": layer
        for name, layer in module.named_modules()
        if isinstance(layer, LoraLayer)
    }


def merged_weight(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, transposed: bool = False
) -> torch.Tensor:
    """W + B @ A * scaling, as peft merges it (computed in fp32, returned in W's dtype)."""
    delta = (lora_b.float() @ lora_a.float()) * scaling
    return (weight.float() + (delta.T if transposed else delta)).to(weight.dtype)


def _layer_out(layer: Any) -> OutWeight:
    (adapter,) = layer.active_adapters
    weight, a, b = layer.base_layer.weight, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    scaling, transposed = layer.scaling[adapter], bool(getattr(layer, "fan_in_fan_out", False))
    return [weight, a, b], lambda read: merged_weight(read(weight), read(a), read(b), scaling, transposed)


def sync_weights(module: torch.nn.Module) -> dict[str, OutWeight]:
    """What the rollout engines need after a step: every weight when all train, only the merged
    adapted ones under LoRA (the engines keep the frozen rest)."""
    if not is_lora(module):
        return _plain(module)
    return {name: _layer_out(layer) for name, layer in lora_layers(module).items()}


def export_weights(module: torch.nn.Module) -> dict[str, OutWeight]:
    """Every weight of the base model, adapted ones merged: a from_pretrained folder without peft."""
    if not is_lora(module):
        return _plain(module)
    out = {base_name(name): _as_is(p) for name, p in module.named_parameters() if not is_adapter(name)}
    out.update(sync_weights(module))
    return out


def _plain(module: torch.nn.Module) -> dict[str, OutWeight]:
    return {name: _as_is(p) for name, p in module.named_parameters()}


def _as_is(param: torch.nn.Parameter) -> OutWeight:
    return [param], lambda read: read(param)


def trainable_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
