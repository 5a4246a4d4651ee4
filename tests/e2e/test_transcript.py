"""Reading kubectl's aligned tables, and keeping only the lines that changed."""

from __future__ import annotations

import pytest

from tests.e2e.transcript import Transcript, parse_table

pytestmark = pytest.mark.unit

TABLE = """\
NAME        PHASE     ALGORITHM   STEP   TOTAL   REWARD   AGE
tiny-grpo   Running   grpo               30               4s
other       Pending   ppo         12     30      0.5      2m
"""


def test_parse_table_keeps_blank_cells_blank() -> None:
    rows = parse_table(TABLE)
    assert rows[0] == {"NAME": "tiny-grpo", "PHASE": "Running", "ALGORITHM": "grpo", "STEP": "",
                       "TOTAL": "30", "REWARD": "", "AGE": "4s"}
    assert rows[1]["STEP"] == "12" and rows[1]["REWARD"] == "0.5"


def test_parse_table_of_nothing_is_empty() -> None:
    assert parse_table("") == []


def test_transcript_records_a_row_only_when_more_than_its_age_changed() -> None:
    outputs = iter([
        "NAME  PHASE    STEP  AGE\njob   Running  1     1s\n",
        "NAME  PHASE    STEP  AGE\njob   Running  1     2s\n",
        "NAME  PHASE    STEP  AGE\njob   Running  2     3s\n",
    ])
    transcript = Transcript(lambda: next(outputs))
    for _ in range(3):
        transcript.poll()
    assert [row["STEP"] for row in transcript.rows] == ["1", "2"]
    assert transcript.text().splitlines() == ["NAME  PHASE    STEP  AGE", "job   Running  1     1s",
                                              "job   Running  2     3s"]
