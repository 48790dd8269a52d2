"""JSON columns take what Python computes: NaN / Infinity (an error metric over a zero) become null."""

from __future__ import annotations

import math

from db.engine import make_engine, make_session_factory
from db.migrate import upgrade
from db.models import Device


def test_non_finite_numbers_are_stored_as_null(db_url: str) -> None:
    upgrade(db_url)
    factory = make_session_factory(make_engine(db_url))
    settings = {"mape": math.inf, "nested": [1.5, -math.inf, {"x": math.nan}], "ok": 2.0}
    with factory() as session:
        device = Device(name="board", runtime="onnxruntime", settings=settings)
        session.add(device)
        session.commit()
        device_id = device.id
    with factory() as session:
        stored = session.get(Device, device_id)
        assert stored is not None
        assert stored.settings == {"mape": None, "nested": [1.5, None, {"x": None}], "ok": 2.0}
