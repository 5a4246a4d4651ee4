"""The Kubernetes conventions the operator and the status reporter share."""

from __future__ import annotations

import datetime

import pytest

from kuberlhf import api
from kuberlhf.kube import now_rfc3339, rfc3339, rlhfjob_path

pytestmark = pytest.mark.unit


def test_timestamps_are_utc_whole_seconds_with_a_z_whatever_the_input_zone() -> None:
    plus_two = datetime.timezone(datetime.timedelta(hours=2))
    moment = datetime.datetime(2026, 12, 2, 5, 6, 7, 890_000, tzinfo=plus_two)
    assert rfc3339(moment) == "2026-12-02T03:06:07Z"
    parsed = datetime.datetime.strptime(now_rfc3339(), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    assert abs((datetime.datetime.now(tz=datetime.UTC) - parsed).total_seconds()) < 5


def test_the_status_path_is_spelt_from_the_api_group_version_and_plural() -> None:
    expected = f"/apis/{api.GROUP}/{api.VERSION}/namespaces/team-a/rlhfjobs/tiny"
    assert rlhfjob_path("team-a", "tiny") == expected
    assert rlhfjob_path("team-a", "tiny", "status").endswith("/rlhfjobs/tiny/status")
