"""Loading and first inspection of an upload, in a child process with memory and time limits.

The API process never opens an uploaded archive itself. :func:`inspect_in_child` runs
``python -m service.inspect_process`` on the received file: the child sets its address-space
limit (``RLIMIT_AS``) to ``Settings.inspect_memory_bytes`` before importing anything heavy,
loads and describes the file (:func:`service.uploads.inspect_model` /
:func:`~service.uploads.inspect_dataset`, with the archive limits of the settings) and
prints one JSON line; the parent kills it after ``Settings.inspect_timeout_s``. A file that
exhausts memory, hangs or crashes the loader takes only that process down; the server
answers 413 (over a size or memory limit) or 400 (anything else) with a message naming the
limit and its setting.

A fresh interpreter (not ``fork``: the server has threads) costs about 1.6 s, the import of
torch, plus 1.4 s of torch.export's first-use imports for a model (``bench/upload_bombs.py``,
figures in ``bench/RESULTS.md``); the API process itself never imports torch for an upload.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from service.settings import Settings

Kind = Literal["model", "dataset"]
_REPO = Path(__file__).resolve().parents[1]
_STDERR_TAIL = 4000
log = logging.getLogger(__name__)


def archive_limits(settings: Settings) -> dict[str, int]:
    """The settings' archive limits, as :class:`compression.archive_check.ArchiveLimits` fields.

    A plain dict: the API process never imports the model side (and torch) for an upload.
    """
    return {
        "max_unpacked_bytes": settings.max_unpacked_bytes,
        "max_model_params": settings.max_model_params,
        "max_dataset_elements": settings.max_dataset_elements,
    }


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # One thread and two malloc arenas: per-thread stacks and arenas reserve address space
    # that RLIMIT_AS counts, so the limit then measures what loading really needs.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MALLOC_ARENA_MAX="2")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO), env.get("PYTHONPATH", "")) if p)
    return env


def inspect_in_child(kind: Kind, path: Path, settings: Settings) -> dict[str, Any]:
    """Load and describe the upload at ``path`` in a child process (blocking).

    Raises:
        service.uploads.UploadError: the file is refused (``status`` 400 or 413), the child
            ran out of memory or time, or crashed.
    """
    from service.uploads import UploadError

    memory = settings.inspect_memory_bytes
    cmd = [
        sys.executable,
        "-m",
        "service.inspect_process",
        kind,
        str(path.resolve()),
        str(memory),
        json.dumps(archive_limits(settings)),
    ]
    with tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.run(
                cmd, stdout=subprocess.PIPE, stderr=err, env=_child_env(), timeout=settings.inspect_timeout_s
            )
        except subprocess.TimeoutExpired:
            raise UploadError(
                f"checking the upload took longer than the limit of {settings.inspect_timeout_s:g} s "
                "(MODELTAILOR_INSPECT_TIMEOUT_S)"
            ) from None
        err.seek(max(0, err.seek(0, os.SEEK_END) - _STDERR_TAIL))
        stderr_tail = err.read().decode(errors="replace")
    lines = proc.stdout.decode(errors="replace").strip().splitlines()
    try:
        result = json.loads(lines[-1]) if proc.returncode == 0 and lines else None
    except ValueError:
        result = None
    if isinstance(result, dict) and isinstance(result.get("ok"), dict):
        return result["ok"]
    if isinstance(result, dict) and isinstance(result.get("error"), str):
        raise UploadError(result["error"], status=int(result.get("status", 400)))
    log.warning("upload inspection exited with %s; stderr tail:\n%s", proc.returncode, stderr_tail)
    how = (
        f"was killed by {signal.Signals(-proc.returncode).name}"
        if proc.returncode < 0
        else f"failed (exit status {proc.returncode})"
    )
    raise UploadError(
        f"checking the upload {how}: the file is malformed or needs more than the limit of "
        f"{memory:,} bytes of memory (MODELTAILOR_INSPECT_MEMORY_BYTES)"
    )


def _run(kind: str, path: Path, memory: int, limits_json: str) -> dict[str, Any]:
    """The child's work, after its memory limit is set; the JSON line it prints."""
    from compression.archive_check import ArchiveLimits
    from service.uploads import UploadError, inspect_dataset, inspect_model

    limits = ArchiveLimits(**json.loads(limits_json))
    try:
        if kind == "model":
            return {"ok": inspect_model(path, limits)}
        return {"ok": inspect_dataset(path, limits)}
    except UploadError as exc:
        return {"error": str(exc), "status": exc.status}
    except MemoryError:
        return {
            "error": f"checking the upload needs more than the limit of {memory:,} bytes of memory "
            "(MODELTAILOR_INSPECT_MEMORY_BYTES)",
            "status": 413,
        }


def main(argv: list[str]) -> None:
    """Child entry: ``python -m service.inspect_process KIND PATH MEMORY_BYTES LIMITS_JSON``."""
    kind, path, memory, limits_json = argv
    resource.setrlimit(resource.RLIMIT_AS, (int(memory), int(memory)))
    print(json.dumps(_run(kind, Path(path), int(memory), limits_json)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
