"""Background upkeep of the service database, so that no read has to write.

One :class:`Housekeeper` thread runs in the API process and in each ``modeltailor worker``
(several at once are harmless: every step is a compare-and-set or idempotent). Each tick
(``Settings.poll_s``, at least half a second) it

* ends running calibrations whose lease lapsed as failed (their process died; see
  ``service.calibrations.expire_abandoned``), which frees their device;
* mirrors predictor versions that appeared in a device's store without a ``predictors`` row
  (written by ``modeltailor calibrate`` with the same data directory, or a tenant's job whose
  process died between fitting and publishing; ``service.predictor_versions.mirror_all``);
* recomputes the Pareto flags of jobs whose flags went stale (bulk loads, databases migrated
  from before the flags; ``service.queries.refresh_front``). Reads of such a job's front
  compute it in memory meanwhile.

Each step reads first (a read-only session) and opens a writing session only when it has
something to write, so an idle tick takes no write lock on SQLite.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from db import work_queue
from db.engine import read_session
from db.models import Job
from db.work_queue import CALIBRATIONS
from service import calibrations, queries
from service.predictor_versions import mirror_all

log = logging.getLogger("modeltailor.housekeeping")

#: Fronts are checked every this many ticks (a count over the candidates of every job).
FRONT_EVERY = 10


class Housekeeper:
    """Runs :meth:`tick` every ``interval_s`` in a daemon thread until :meth:`stop`."""

    def __init__(self, factory: sessionmaker[Session], data_dir: Path, *, interval_s: float) -> None:
        self.factory = factory
        self.data_dir = Path(data_dir)
        self.interval_s = max(0.5, float(interval_s))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ticks = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="housekeeping", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the loop must survive a database hiccup
                log.exception("housekeeping error")
            self._stop.wait(self.interval_s)

    def tick(self) -> None:
        """One round of every step."""
        self.end_abandoned_calibrations()
        mirror_all(self.factory, data_dir=self.data_dir)
        if self._ticks % FRONT_EVERY == 0:
            self.refresh_stale_fronts()
        self._ticks += 1

    def end_abandoned_calibrations(self) -> list[int]:
        with read_session(self.factory) as session:
            lapsed = work_queue.has_expired(session, CALIBRATIONS)
        if not lapsed:
            return []
        with self.factory() as session:
            ended = calibrations.expire_abandoned(session)
        for cal_id in ended:
            log.warning("calibration %s: its process stopped responding; ended as failed", cal_id)
        return ended

    def refresh_stale_fronts(self) -> list[int]:
        with read_session(self.factory) as session:
            stale = queries.stale_fronts(session)
        for job_id in stale:
            with self.factory() as session:
                job = session.get(Job, job_id)
                if job is not None:
                    queries.refresh_front(session, job=job)
        return stale


__all__ = ["Housekeeper"]
