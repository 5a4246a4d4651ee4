"""The emulator process's token file: tokens appended by the test become valid identities."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.apiserver import read_tokens

pytestmark = pytest.mark.unit


def test_read_tokens_maps_each_token_to_its_user_and_skips_a_half_written_line(tmp_path: Path) -> None:
    path = tmp_path / "tokens.jsonl"
    path.write_text(json.dumps({"token": "t1", "user": "system:serviceaccount:a:b"}) + "\n"
                    + json.dumps({"token": "t2", "user": "kuberay-standin"}) + "\n" + '{"token": "t3", "us')
    assert read_tokens(path) == {"t1": "system:serviceaccount:a:b", "t2": "kuberay-standin"}


def test_read_tokens_of_a_missing_file_is_empty(tmp_path: Path) -> None:
    assert read_tokens(tmp_path / "absent.jsonl") == {}
