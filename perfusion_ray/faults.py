"""Crash points for recovery tests: PERFUSION_FAULT_AFTER=<step> kills the process right after <step>.

Exactly-once claims (ingest watermark, coordinator round state) are only worth what a real crash at
each step shows; the tests set this variable in a subprocess, then rerun without it and compare.
"""

from __future__ import annotations

import os

FAULT_ENV = "PERFUSION_FAULT_AFTER"
FAULT_EXIT_CODE = 75


def fault_point(step: str) -> None:
    if os.environ.get(FAULT_ENV) == step:
        os._exit(FAULT_EXIT_CODE)  # no cleanup, no flush: as abrupt as a kill
