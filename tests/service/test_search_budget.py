"""A job's seconds budget is search time: calibrating the device first does not eat it."""

from __future__ import annotations

import datetime as dt

import pytest

from db.models import Job, utcnow
from service.runner import _search_seconds


def _job(started_s_ago: float, progress: dict[str, object]) -> Job:
    return Job(started_at=utcnow() - dt.timedelta(seconds=started_s_ago), progress=progress)


def test_calibration_time_is_not_search_time() -> None:
    assert _search_seconds(_job(500, {"phase": "calibrating 12/48"})) == 0.0
    assert _search_seconds(_job(500, {"phase": "waiting for calibration 3: 4/48"})) == 0.0
    after = _job(130, {"phase": "searching", "calibration": {"id": 1, "version": 1, "seconds": 100.0}})
    assert _search_seconds(after) == pytest.approx(30, abs=2)
    plain = _job(130, {"phase": "searching", "done": 3})
    assert _search_seconds(plain) == pytest.approx(130, abs=2)
