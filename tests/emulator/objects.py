"""Pure object operations of the API emulator: patches, selectors, tables.

Kept free of I/O so each rule the real API server applies (merge-patch null deletes,
JSON-patch test failures, label-selector grammar, printer-column rendering) is checked
without a server and reused by every verb that needs it.
"""

from __future__ import annotations

import copy
import datetime
import re
from typing import Any

Obj = dict[str, Any]


class PatchError(ValueError):
    """A patch that cannot apply; the server answers 422 with this message."""


def now_rfc3339() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: dicts merge recursively, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"JSON pointer {path!r} must start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, tokens: list[str], path: str) -> Any:
    for token in tokens:
        if isinstance(doc, dict) and token in doc:
            doc = doc[token]
        elif isinstance(doc, list) and token.isdigit() and int(token) < len(doc):
            doc = doc[int(token)]
        else:
            raise PatchError(f"path {path!r} does not exist")
    return doc


def _add(doc: Any, tokens: list[str], value: Any, path: str) -> Any:
    if not tokens:
        return value
    parent = _walk(doc, tokens[:-1], path)
    last = tokens[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        index = len(parent) if last == "-" else int(last) if last.isdigit() else -1
        if not 0 <= index <= len(parent):
            raise PatchError(f"index in {path!r} is out of range")
        parent.insert(index, value)
    else:
        raise PatchError(f"cannot add at {path!r}")
    return doc


def _remove(doc: Any, tokens: list[str], path: str) -> Any:
    if not tokens:
        raise PatchError("cannot remove the whole document")
    parent = _walk(doc, tokens[:-1], path)
    last = tokens[-1]
    if isinstance(parent, dict) and last in parent:
        return parent.pop(last)
    if isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
        return parent.pop(int(last))
    raise PatchError(f"path {path!r} does not exist")


def json_patch(doc: Any, operations: Any) -> Any:
    """RFC 6902 on a copy of `doc`; a failed `test` or a missing path raises PatchError."""
    if not isinstance(operations, list):
        raise PatchError("a JSON patch must be a list of operations")
    doc = copy.deepcopy(doc)
    for op in operations:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise PatchError(f"malformed JSON patch operation {op!r}")
        kind, path = op["op"], op["path"]
        tokens = _pointer(path)
        if kind == "test":
            if _walk(doc, tokens, path) != op.get("value"):
                raise PatchError(f"test operation failed at {path!r}")
        elif kind == "add":
            doc = _add(doc, tokens, copy.deepcopy(op.get("value")), path)
        elif kind == "remove":
            _remove(doc, tokens, path)
        elif kind == "replace":
            _walk(doc, tokens, path)
            if tokens:
                _remove(doc, tokens, path)
            doc = _add(doc, tokens, copy.deepcopy(op.get("value")), path)
        elif kind in ("move", "copy"):
            source = op.get("from", "")
            value = copy.deepcopy(_walk(doc, _pointer(source), source))
            if kind == "move":
                _remove(doc, _pointer(source), source)
            doc = _add(doc, tokens, value, path)
        else:
            raise PatchError(f"unknown JSON patch operation {kind!r}")
    return doc


_REQUIREMENT = re.compile(
    r"^\s*(?P<neg>!)?\s*(?P<key>[A-Za-z0-9_./-]+)\s*"
    r"(?:(?P<op>==|=|!=)\s*(?P<value>[A-Za-z0-9_.-]*)|\s+(?P<setop>in|notin)\s*\((?P<values>[^)]*)\))?\s*$"
)


def _split_selector(selector: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in selector:
        depth += char == "("
        depth -= char == ")"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p for p in parts if p.strip()]


def label_selector_matches(selector: str | None, labels: dict[str, str] | None) -> bool:
    """Kubernetes label-selector grammar: =, ==, !=, in, notin, key, !key (ANDed)."""
    if not selector:
        return True
    labels = labels or {}
    for requirement in _split_selector(selector):
        m = _REQUIREMENT.match(requirement)
        if m is None:
            raise PatchError(f"unable to parse label requirement {requirement!r}")
        key = m["key"]
        if m["neg"]:
            ok = key not in labels
        elif m["op"] in ("=", "=="):
            ok = labels.get(key) == m["value"]
        elif m["op"] == "!=":
            ok = labels.get(key) != m["value"]
        elif m["setop"]:
            values = {v.strip() for v in m["values"].split(",") if v.strip()}
            ok = (labels.get(key) in values) if m["setop"] == "in" else (labels.get(key) not in values)
        else:
            ok = key in labels
        if not ok:
            return False
    return True


def field_selector_matches(selector: str | None, obj: Obj) -> bool:
    """Field selectors (=, ==, !=) on any dotted path, such as `kubectl describe`'s
    involvedObject.name for Events; the real server allows a fixed set per resource."""
    if not selector:
        return True
    for requirement in _split_selector(selector):
        negate = "!=" in requirement
        key, _, value = requirement.partition("!=" if negate else "=")
        key, value = key.strip(), value.strip().lstrip("=")
        found = json_path_value(obj, key)
        if (("" if found is None else str(found)) == value) == negate:
            return False
    return True


def json_path_value(obj: Any, path: str) -> Any:
    """A printer column's simple JSONPath (`.a.b`, `.a[0].b`); missing → None."""
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        if part.startswith("["):
            index = int(part[1:-1])
            obj = obj[index] if isinstance(obj, list) and index < len(obj) else None
        else:
            obj = obj.get(part) if isinstance(obj, dict) else None
        if obj is None:
            return None
    return obj


def human_age(timestamp: str | None) -> str:
    """The server renders `date` columns as an age, as kube-apiserver's table convertor does."""
    if not timestamp:
        return "<unknown>"
    then = datetime.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    seconds = max(0, int((datetime.datetime.now(tz=datetime.UTC) - then).total_seconds()))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 3600 * 2:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


DEFAULT_COLUMNS = [{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]


def table(objects: list[Obj], columns: list[dict[str, Any]] | None, resource_version: str) -> Obj:
    """A meta.k8s.io/v1 Table, the shape `kubectl get` asks for with `as=Table`."""
    columns = columns or DEFAULT_COLUMNS
    definitions = [{"name": "Name", "type": "string", "format": "name", "description": "Name",
                    "priority": 0}]
    definitions += [{"name": c["name"], "type": c.get("type", "string"), "format": c.get("format", ""),
                     "description": c.get("description", ""), "priority": c.get("priority", 0)}
                    for c in columns]
    rows = []
    for obj in objects:
        cells: list[Any] = [obj["metadata"]["name"]]
        for column in columns:
            value = json_path_value(obj, column["jsonPath"])
            cells.append(human_age(value) if column.get("type") == "date" else value)
        meta = {k: v for k, v in obj["metadata"].items() if k != "managedFields"}
        rows.append({"cells": cells, "object": {"kind": "PartialObjectMetadata",
                                                "apiVersion": "meta.k8s.io/v1", "metadata": meta}})
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1",
            "metadata": {"resourceVersion": resource_version},
            "columnDefinitions": definitions, "rows": rows}


def status_error(code: int, reason: str, message: str, details: Obj | None = None) -> Obj:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "code": code, "reason": reason, "message": message, "details": details or {}}


def owners_alive(obj: Obj, live_uids: set[str]) -> bool:
    """Garbage collection keeps an object while at least one of its owners exists."""
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    return not refs or any(ref.get("uid") in live_uids for ref in refs)
