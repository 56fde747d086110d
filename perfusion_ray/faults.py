"""Crash points for recovery tests: PERFUSION_FAULT_AFTER=<step> kills the process right after <step>.

Exactly-once claims (ingest watermark, coordinator round state) and resumes that always finish are only
worth what a real crash at each step shows; the tests set this variable, then rerun (or let Ray Train
restart the killed worker) and compare with a run that never crashed.

With PERFUSION_FAULT_ONCE=<marker file> as well, the point fires once: the first process to reach it creates
the marker (atomically) and dies; every later one, e.g. the worker Ray Train starts in its place, finds the
marker and goes on. The marker records the step and the process that died.
"""

from __future__ import annotations

import os

FAULT_ENV = "PERFUSION_FAULT_AFTER"
FAULT_ONCE_ENV = "PERFUSION_FAULT_ONCE"
FAULT_EXIT_CODE = 75


def fault_point(step: str) -> None:
    if os.environ.get(FAULT_ENV) != step:
        return
    marker = os.environ.get(FAULT_ONCE_ENV)
    if marker:
        try:
            handle = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # fired already, in an earlier process
        os.write(handle, f"{step} pid={os.getpid()}\n".encode())
        os.fsync(handle)
        os.close(handle)
    os._exit(FAULT_EXIT_CODE)  # no cleanup, no flush: as abrupt as a kill


def fault_env() -> dict[str, str]:
    """The fault variables set in this process, for the runtime_env of the workers it starts."""
    return {key: os.environ[key] for key in (FAULT_ENV, FAULT_ONCE_ENV) if key in os.environ}
