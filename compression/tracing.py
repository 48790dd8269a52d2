"""One lock for torch's tracing machinery: ``torch.export`` (export, save, load) and the ONNX exporters.

torch keeps the stack of dispatch modes that tracing pushes in process-wide state, so two
threads tracing at once corrupt each other ("Trying to pop empty mode stack"). The service
runs several jobs and device calibrations as threads of one process, so every trace in
modeltailor holds this lock. Tracing is a small part of a job's time; scoring runs unlocked.
"""

from __future__ import annotations

import threading

TRACE_LOCK = threading.RLock()
