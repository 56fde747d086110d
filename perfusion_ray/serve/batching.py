"""One bad request fails alone: a batch that raises is run again request by request.

@serve.batch hands a whole batch's exception to every request in it, so a request that slipped past
validation and breaks the model would fail every valid request it shares the batch with. `each_alone`
runs the batch; if that raises, it runs each job by itself and returns, per job, its result or its own
exception, which the job's caller raises. The happy path costs nothing; a failing batch costs one more
pass, one job at a time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import TypeVar

Job = TypeVar("Job")
Result = TypeVar("Result")
Model = TypeVar("Model")

logger = logging.getLogger("ray.serve")


def each_alone(run: Callable[[Sequence[Job]], Sequence[Result]], jobs: Sequence[Job]) -> list[Result | Exception]:
    """run(jobs), or, when that raises, [run([job])[0] or the exception it raised, for each job]."""
    try:
        return list(run(jobs))
    except Exception as exc:  # noqa: BLE001 - the jobs are retried one by one; each gets its own outcome
        if len(jobs) == 1:
            return [exc]
        logger.warning("a batch of %d requests failed (%r); running them one by one", len(jobs), exc)
    out: list[Result | Exception] = []
    for job in jobs:
        try:
            out.append(run([job])[0])
        except Exception as exc:  # noqa: BLE001
            out.append(exc)
    return out


def unwrap(outcome: Result | Exception) -> Result:
    """A job's result, or raise its exception (in the caller's request, not the batch's)."""
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


async def served_outcomes(executor: Executor, served: Model, run: Callable[[Model, Sequence[Job]], Sequence[Result]],
                          jobs: Sequence[Job]) -> list[tuple[Result | Exception, Model]]:
    """A @serve.batch body: run(served, jobs) on `executor` through each_alone, every outcome paired with the
    model that produced it (the whole batch uses, and reports, that one model)."""
    outcomes = await asyncio.get_running_loop().run_in_executor(executor, each_alone,
                                                                lambda some: run(served, some), jobs)
    return [(outcome, served) for outcome in outcomes]
