"""Model references as the spec names them, resolved on the node that loads them.

Actors get references, not paths: in a cluster the driver's folders are not on the workers'
pods, so each actor resolves its own copy (builtin models are built where they are needed).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class ModelRef(NamedTuple):
    """A spec's model reference and the field it came from (for error messages)."""

    ref: str
    field: str


def local_model(model: ModelRef) -> str:
    """The model as a local directory on this node (builtin models are built here, once)."""
    from kuberlhf_workers.base.builtin import resolve_model

    return str(resolve_model(model.ref, field=model.field))


def local_tokenizer(model: ModelRef) -> str:
    """A folder AutoTokenizer loads `model`'s tokenizer from: for a hub model its tokenizer and config
    files only, so the driver never downloads weights it does not use."""
    from kuberlhf_workers.base.builtin import resolve_model

    return str(resolve_model(model.ref, field=model.field, tokenizer_only=True))


def pick_device(gpus: float) -> torch.device:
    """The device an actor that asked Ray for `gpus` GPUs computes on."""
    return torch.device("cuda") if gpus > 0 and torch.cuda.is_available() else torch.device("cpu")
