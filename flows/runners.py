"""The task runner a flow fans out on: threads by default, Dask when configured.

Settings ``TASK_RUNNER`` (``thread`` or ``dask``) and ``DASK_ADDRESS`` choose it; callers pass
the runner to a flow with ``flow.with_options(task_runner=make_task_runner(...))``. The workers
of an existing Dask cluster need this package installed and ``PREFECT_API_URL`` pointing at the
flow's Prefect API, since each task reports its state from the worker.
"""

from __future__ import annotations

import os
from typing import Any

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner


class UnknownTaskRunnerError(ValueError):
    """A TASK_RUNNER value other than thread or dask."""


def default_workers() -> int:
    """One thread per CPU this process may use: fits are CPU-bound, and more threads than
    cores only add contention for the interpreter lock and memory arenas."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def make_task_runner(
    kind: str = "thread", dask_address: str = "", workers: int | None = None
) -> TaskRunner[Any]:
    """``thread``: a pool of ``workers`` threads (default: one per CPU) in the flow's process;
    ``dask``: prefect-dask's runner on the cluster at ``dask_address``, or on a local cluster
    of ``workers`` in-process workers when no address is given."""
    if kind == "thread":
        return ThreadPoolTaskRunner(max_workers=workers or default_workers())
    if kind == "dask":
        from prefect_dask import DaskTaskRunner

        if dask_address:
            return DaskTaskRunner(address=dask_address)
        return DaskTaskRunner(
            cluster_kwargs={
                "n_workers": workers or default_workers(),
                "threads_per_worker": 1,
                "processes": False,
                "dashboard_address": None,
            }
        )
    raise UnknownTaskRunnerError(f"unknown task runner {kind!r}; use 'thread' or 'dask'")
