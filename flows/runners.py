"""The task runner a flow fans out on: threads by default, Dask when configured."""

from __future__ import annotations

from typing import Any

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner


class UnknownTaskRunnerError(ValueError):
    """A TASK_RUNNER value other than thread or dask."""


def make_task_runner(
    kind: str = "thread", dask_address: str = "", workers: int | None = None
) -> TaskRunner[Any]:
    """``thread``: a thread pool in the flow's process; ``dask``: prefect-dask's runner on the
    cluster at ``dask_address``, or on a local cluster when no address is given."""
    if kind == "thread":
        return ThreadPoolTaskRunner(max_workers=workers)
    if kind == "dask":
        from prefect_dask import DaskTaskRunner

        if dask_address:
            return DaskTaskRunner(address=dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers or 2, "processes": False})
    raise UnknownTaskRunnerError(f"unknown task runner {kind!r}; use 'thread' or 'dask'")
