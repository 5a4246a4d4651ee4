"""Kubernetes conventions shared by the operator and the training program's status reporter.

Both write the RLHFJob's status; spelling its path and its timestamps once keeps them from
drifting apart.
"""

from __future__ import annotations

import datetime
from typing import Any

from kuberlhf.api import API_VERSION, PLURAL

Obj = dict[str, Any]  # a Kubernetes object or fragment, as decoded JSON


def rfc3339(moment: datetime.datetime) -> str:
    """A Kubernetes timestamp: UTC, whole seconds, a Z suffix (what metav1.Time serialises to)."""
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_rfc3339() -> str:
    return rfc3339(datetime.datetime.now(tz=datetime.UTC))


def rlhfjob_path(namespace: str, name: str, subresource: str | None = None) -> str:
    """The API path of one RLHFJob (or of its subresource, such as status)."""
    path = f"/apis/{API_VERSION}/namespaces/{namespace}/{PLURAL}/{name}"
    return f"{path}/{subresource}" if subresource else path
