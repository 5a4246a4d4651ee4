"""RLHFJob files: reading one from disk and the checks only a machine holding the spec can make.

Shared by `kuberlhf validate`, `kuberlhf render` and `kuberlhf run` (the training program's entry
point reads its spec through here, not through the command line module).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kuberlhf import api
from kuberlhf.files import find_spec_file


def load_documents(path: Path) -> list[Any]:
    """All YAML documents of a file; a file that is not YAML becomes a SpecError."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise api.SpecError([f"{path}: cannot read ({exc.strerror})"]) from None
    except UnicodeDecodeError as exc:
        raise api.SpecError([f"{path}: not UTF-8 text (byte {exc.start}): save the file as UTF-8"]) from None
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        # PyYAML's message spans several lines (with a source excerpt): keep one line per problem.
        raise api.SpecError([f"{path}: not valid YAML: {' '.join(str(exc).split())}"]) from None
    except RecursionError:
        raise api.SpecError([f"{path}: not valid YAML: nested too deeply"]) from None


def local_problems(job: api.RLHFJob, spec_dir: Path) -> list[str]:
    """Checks only a laptop can make: files the spec points at must exist."""
    problems = []
    fn = job.spec.reward.function if job.spec.reward is not None else None
    if fn is not None:
        target, _, name = fn.rpartition(":")
        if not target or not name:
            problems.append(f"spec.reward.function: {fn!r} must look like 'file.py:fn' or 'module:fn'")
        elif target.endswith(".py") and find_spec_file(Path(target), spec_dir) is None:
            problems.append(f"spec.reward.function: file {target!r} not found next to the spec ({spec_dir})")
    cls = job.spec.environment.class_ if job.spec.environment is not None else None
    if cls is not None:
        target, _, name = cls.rpartition(":")
        if not target or not name:
            problems.append(f"spec.environment.class: {cls!r} must look like 'file.py:ClassName' or "
                            "'module:ClassName'")
        elif target.endswith(".py") and find_spec_file(Path(target), spec_dir) is None:
            problems.append(
                f"spec.environment.class: file {target!r} not found next to the spec ({spec_dir})"
            )
    for field, value in (("train", job.spec.data.train), ("eval", job.spec.data.eval)):
        if value is not None and find_spec_file(Path(value), spec_dir) is None:
            problems.append(
                f"spec.data.{field}: file {value!r} not found (relative paths start at {spec_dir})"
            )
    return problems


def load_job(path: Path, check_files: bool = True) -> api.RLHFJob:
    """Read and validate a single-RLHFJob file, raising SpecError with every problem."""
    docs = load_documents(path)
    if len(docs) != 1:
        raise api.SpecError([f"{path}: expected exactly one RLHFJob document, found {len(docs)}"])
    job = api.parse_job(docs[0])
    problems = local_problems(job, path.parent) if check_files else []
    if problems:
        raise api.SpecError(problems)
    return job
