"""The steps of ingestion and online training: plan, fetch, store, bound the training data, trim.

Only ``fetch_window`` talks to Prometheus, so only it retries. Every task opens the DuckDB store
for its own step and closes it; tasks that write run one at a time, from the flow's thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from flows.tasks import run_logger
from storage.dumps import SAMPLE_SCHEMA
from storage.prometheus import (
    PrometheusSource,
    QueryWindow,
    fetch_range,
    plan_rounds,
    start_times,
)
from storage.samples import LoadResult, SampleStore, Watermark

FETCH_RETRIES = 4
FETCH_RETRY_DELAY = 5.0  # seconds before the first retry; doubled for each next one


@dataclass
class IngestReport:
    """What an ingest run fetched and stored, JSON-friendly for flow results."""

    server: str
    metrics: int
    start: float | None = None
    end: float | None = None
    rounds: int = 0
    queries: int = 0
    samples_seen: int = 0
    samples_added: int = 0
    load_ids: list[int] = field(default_factory=list)

    def record(self, windows: list[QueryWindow], load: LoadResult) -> None:
        first, last = min(w.start for w in windows), max(w.end for w in windows)
        self.start = first if self.start is None else min(self.start, first)
        self.end = last if self.end is None else max(self.end, last)
        self.rounds += 1
        self.queries += len(windows)
        self.samples_seen += load.samples_seen
        self.samples_added += load.samples_added
        self.load_ids.append(load.load_id)


@task(cache_policy=NO_CACHE)
def plan_ingest(
    db_path: Path,
    server: str,
    metrics: list[str],
    start: float | None,
    end: float,
    step: int,
    first_window: float,
    keep: float,
    max_points: int,
) -> list[list[QueryWindow]]:
    """The query windows of this run, from the watermarks stored for ``server``."""
    with SampleStore(db_path) as store:
        watermarks = store.watermarks(server)
    starts = start_times(metrics, watermarks, start, end, step, first_window, keep)
    rounds = plan_rounds(starts, end, step, max_points)
    resumed = sum(1 for m in metrics if m in watermarks)
    run_logger().info(
        "ingest plan for %s: %d metrics (%d from their watermark) up to %.0f, %d queries "
        "in %d rounds",
        server,
        len(metrics),
        resumed if start is None else 0,
        end,
        sum(len(r) for r in rounds),
        len(rounds),
    )
    return rounds


@task(
    cache_policy=NO_CACHE,
    retries=FETCH_RETRIES,
    retry_delay_seconds=exponential_backoff(backoff_factor=FETCH_RETRY_DELAY),
    retry_jitter_factor=0.2,
    task_run_name="fetch {window.metric}",
)
def fetch_window(source: PrometheusSource, window: QueryWindow, step: int) -> pl.DataFrame:
    return fetch_range(source, window, step)


@task(cache_policy=NO_CACHE)
def store_round(
    db_path: Path, server: str, windows: list[QueryWindow], frames: list[pl.DataFrame]
) -> LoadResult:
    """One round's samples and the watermarks they complete, in one transaction."""
    frame = pl.concat(frames) if frames else pl.DataFrame(schema=SAMPLE_SCHEMA)
    marks = [Watermark(server, w.metric, w.end) for w in windows]
    first, last = min(w.start for w in windows), max(w.end for w in windows)
    with SampleStore(db_path) as store:
        load = store.ingest(frame, origin=f"{server} [{first:.0f}, {last:.0f}]", watermarks=marks)
    run_logger().info(
        "stored %d of %d samples from %s for [%.0f, %.0f]",
        load.samples_added,
        load.samples_seen,
        server,
        first,
        last,
    )
    return load


@task(cache_policy=NO_CACHE)
def training_bounds(db_path: Path, window: float | None) -> tuple[float, float] | None:
    """The newest ``window`` seconds of stored samples (all of them when None); None when the
    store is empty."""
    with SampleStore(db_path) as store:
        stored = store.time_range()
    if stored is None:
        run_logger().warning("the sample store %s is empty; nothing to train on", db_path)
        return None
    first, last = stored
    start = first if window is None else max(first, last - window)
    run_logger().info("training window [%.0f, %.0f] of %s", start, last, db_path)
    return start, last


@task(cache_policy=NO_CACHE)
def apply_retention(db_path: Path, keep: float) -> int:
    """Delete samples older than ``keep`` seconds before the newest stored sample."""
    with SampleStore(db_path) as store:
        stored = store.time_range()
        if stored is None:
            return 0
        deleted = store.delete_before(stored[1] - keep)
    run_logger().info("retention %.0f s: %d samples deleted from %s", keep, deleted, db_path)
    return deleted
