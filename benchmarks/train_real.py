"""All ten trainers on the bundled real 2023 Kepler dump, through the offline-training flow.

Prints the flow's wall time, the fan-out's wall time (every ``fit_model`` task mapped over the
task runner), the process's peak memory, the MAE/MAPE table, and the same work done in
process without Prefect on the same arrays: the summed estimator fit time, and the summed time
of whole fit tasks (fit, hold-out scoring, archive). ``wall / fit`` is the fan-out's wall time
over the summed estimator fits: below 1 means the runner ran fits side by side, above 1 is
orchestration overhead. Target: under 1.5 with the default (thread) runner.

The flow runs against a Prefect API server that the script starts and stops. The first run
also imports the libraries (a long-running server pays that once) and is shown apart; then
``--repeats`` warm runs alternate with in-process passes, and the best of each is compared,
which keeps other load on the machine out of the ratio as far as possible.

    python benchmarks/train_real.py [--runner thread|dask] [--workers N] [--dask-address URL]
                                    [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.offline_training import offline_training
from flows.runners import make_task_runner
from flows.tasks import FitJob, plan_fits
from modelling.extract import extract
from modelling.trainers import TRAINERS, make_trainer
from modelling.training import train_model
from storage.dumps import read_dump

DUMP = Path(str(resources.files("kepler_model") / "data" / "kepler_workload_2023.json.gz"))


@dataclass(frozen=True)
class InProcess:
    """The fan-out's work done one job after another, without Prefect."""

    estimator_fit_seconds: float
    task_work_seconds: float
    task_work_cpu_seconds: float
    per_trainer: dict[str, float]


def peak_rss_mb() -> float:
    """Peak resident set of this process (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_flow(
    trainers: list[str], runner: Any, folder: Path, name: str
) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    report = offline_training.with_options(task_runner=runner)(
        input=str(DUMP),
        pipeline=name,
        abs_trainers=trainers,
        dyn_trainers=trainers,
        model_path=str(folder / "models"),
        db_path=str(folder / f"{name}.duckdb"),
    )
    return report, time.perf_counter() - started


class TimedTrainer:
    """Wraps a trainer to add up the time spent in its component fits."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.seconds = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.trainer, name)

    def fit_component(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return self.trainer.fit_component(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started


def in_process(jobs: list[FitJob]) -> InProcess:
    fit_total, work_total = 0.0, 0.0
    per_trainer: dict[str, float] = {}
    cpu_started = time.process_time()
    for job in jobs:
        trainer = TimedTrainer(make_trainer(job.trainer))
        started = time.perf_counter()
        model = train_model(trainer, job.data)  # type: ignore[arg-type]
        model.to_archive()
        work_total += time.perf_counter() - started
        fit_total += trainer.seconds
        per_trainer[job.trainer] = per_trainer.get(job.trainer, 0.0) + trainer.seconds
    return InProcess(fit_total, work_total, time.process_time() - cpu_started, per_trainer)


def print_table(models: list[dict[str, Any]]) -> None:
    print(f"\n{'output':9} {'group':19} {'trainer':33} {'MAE (W)':>8} {'MAPE (%)':>9}")
    for m in sorted(models, key=lambda m: (m["output_type"], m["feature_group"], m["mae"])):
        print(
            f"{m['output_type']:9} {m['feature_group']:19} {m['trainer']:33} "
            f"{m['mae']:8.2f} {m['mape']:9.2f}"
        )


@contextmanager
def prefect_api() -> Iterator[None]:
    """A Prefect API server of our own for the runs, stopped on the way out."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = SubprocessASGIServer()
    server.start()
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield
    finally:
        server.stop()


@task(cache_policy=NO_CACHE)
def do_nothing(number: int) -> int:
    return number


@flow
def map_empty_tasks(count: int) -> float:
    """Prefect's own cost of ``count`` mapped task runs: wall seconds of no-op tasks."""
    started = time.perf_counter()
    for future in do_nothing.map(list(range(count))):
        future.result()
    return time.perf_counter() - started


def empty_task_seconds(runner: Any, count: int) -> float:
    seconds: float = map_empty_tasks.with_options(task_runner=runner)(count)
    return seconds


@dataclass(frozen=True)
class Measured:
    """A cold flow run, the warm runs (report, wall seconds) and the in-process passes."""

    cold: tuple[dict[str, Any], float]
    warm: list[tuple[dict[str, Any], float]]
    local: list[InProcess]
    jobs: int
    peak_mb: float
    empty_tasks: list[float]

    @property
    def best(self) -> tuple[dict[str, Any], float]:
        return min(self.warm, key=lambda run: float(run[0]["timings"]["fan_out_seconds"]))

    @property
    def fastest(self) -> InProcess:
        return min(self.local, key=lambda run: run.estimator_fit_seconds)


def measure(runner: Callable[[], Any], repeats: int) -> Measured:
    trainers = list(TRAINERS)
    extraction = extract(read_dump(DUMP))
    jobs = plan_fits.fn(extraction, trainers, trainers, "MinIdleIsolator", {}, 0, None)
    with tempfile.TemporaryDirectory(prefix="train-real-") as tmp, prefect_api():
        folder = Path(tmp)
        cold = run_flow(trainers, runner(), folder, "cold")
        warm, local, empty = [], [], []
        for number in range(repeats):
            warm.append(run_flow(trainers, runner(), folder, f"warm-{number}"))
            local.append(in_process(jobs))
            empty.append(empty_task_seconds(runner(), len(jobs)))
        return Measured(cold, warm, local, len(jobs), peak_rss_mb(), empty)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runner", default="thread", choices=("thread", "dask"))
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--dask-address", default="")
    parser.add_argument("--repeats", type=int, default=3, help="warm runs; the best is shown")
    args = parser.parse_args()
    logging.getLogger("prefect").setLevel(logging.WARNING)

    measured = measure(
        lambda: make_task_runner(args.runner, args.dask_address, args.workers), args.repeats
    )
    report, _ = measured.best
    print_table(report["models"])
    for failure in report["failures"]:
        print(f"FAILED {failure}")
    print(f"\nrunner: {args.runner} (workers: {args.workers or 'default'})")
    print_figures(measured)


def print_figures(measured: Measured) -> None:
    (report, wall), (cold, cold_wall), fastest = measured.best, measured.cold, measured.fastest
    fan_out = report["timings"]["fan_out_seconds"]
    fan_outs = ", ".join(f"{r['timings']['fan_out_seconds']:.2f}" for r, _ in measured.warm)
    fits = ", ".join(f"{run.estimator_fit_seconds:.2f}" for run in measured.local)
    cpu = report["timings"]["fan_out_cpu_seconds"]
    lines = [
        f"models trained: {len(report['models'])}, failed: {len(report['failures'])}",
        f"first run in this process: flow {cold_wall:.2f} s, "
        f"fan-out {cold['timings']['fan_out_seconds']:.2f} s (includes first imports)",
        f"flow wall time (best warm run): {wall:.2f} s (ingest, extraction, fan-out, publish)",
        f"fan-out wall time: best {fan_out:.2f} s for {measured.jobs} fit tasks (runs: {fan_outs})",
        f"peak memory (this process): {measured.peak_mb:.0f} MB",
        f"summed in-process estimator fit time: best {fastest.estimator_fit_seconds:.2f} s "
        f"(runs: {fits})",
        f"summed in-process task work (fit, score, archive): {fastest.task_work_seconds:.2f} s",
        f"ratio fan-out wall / estimator fit: {fan_out / fastest.estimator_fit_seconds:.2f}",
        f"ratio fan-out wall / task work: {fan_out / fastest.task_work_seconds:.2f}",
        f"CPU time: fan-out {cpu:.2f} s (every thread of the process), in-process task work "
        f"{fastest.task_work_cpu_seconds:.2f} s; ratio {cpu / fastest.task_work_cpu_seconds:.2f}",
        f"Prefect's own cost: {measured.jobs} no-op tasks mapped on the same runner take "
        f"{min(measured.empty_tasks):.2f} s (runs: "
        f"{', '.join(f'{s:.2f}' for s in measured.empty_tasks)})",
        f"load average (1, 5, 15 min) at the end: {os.getloadavg()}",
        "estimator fit time per trainer (s):",
    ]
    lines += [
        f"  {name:33} {seconds:6.3f}"
        for name, seconds in sorted(fastest.per_trainer.items(), key=lambda kv: -kv[1])
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
