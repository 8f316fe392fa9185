"""ingest: Kepler's raw series from a live Prometheus into the DuckDB sample store."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from prefect import flow, unmapped
from prefect.tasks import exponential_backoff

from flows.prometheus_tasks import (
    FETCH_RETRIES,
    FETCH_RETRY_DELAY,
    IngestReport,
    fetch_window,
    plan_ingest,
    store_round,
)
from flows.tasks import run_logger
from kepler_model.settings import load_settings
from storage.prometheus import MAX_POINTS, PrometheusSource, duration_seconds, training_metrics


@flow(name="ingest")
def ingest(
    prometheus: str | None = None,
    db_path: str | None = None,
    start: float | None = None,
    end: float | None = None,
    step: int | None = None,
    metrics: list[str] | None = None,
    max_points: int = MAX_POINTS,
    retries: int = FETCH_RETRIES,
    retry_delay_seconds: float = FETCH_RETRY_DELAY,
    data_retention: str | None = None,
) -> dict[str, Any]:
    """Fetch the metrics training needs (or ``metrics``) up to ``end`` (Unix seconds, default
    now), from ``start`` or else from where the last run stopped.

    Unset arguments come from the settings (PROM_SERVER, DUCKDB_PATH, PROM_QUERY_STEP,
    DATA_RETENTION; credentials only from there). A metric never fetched before starts
    PROM_QUERY_INTERVAL before ``end``; a catch-up reaches back at most DATA_RETENTION. Each
    round of chunks is stored with its watermarks in one transaction: a failure keeps the
    rounds already stored, and the next run starts where they stopped.
    """
    settings = load_settings(
        prom_server=prometheus,
        duckdb_path=db_path,
        prom_query_step=step,
        data_retention=data_retention,
    )
    source = PrometheusSource.from_settings(settings)
    names = list(metrics or training_metrics(settings.thirdparty_metrics))
    step_seconds = settings.prom_query_step
    report = IngestReport(server=source.url, metrics=len(names))

    rounds = plan_ingest(
        settings.duckdb_path,
        source.url,
        names,
        start,
        time.time() if end is None else end,
        step_seconds,
        float(settings.prom_query_interval),
        duration_seconds(settings.data_retention),
        max_points,
    )
    fetch = fetch_window.with_options(
        retries=retries, retry_delay_seconds=exponential_backoff(retry_delay_seconds)
    )
    for windows in rounds:
        futures = fetch.map(unmapped(source), windows, unmapped(step_seconds))
        frames = [future.result() for future in futures]
        report.record(windows, store_round(settings.duckdb_path, source.url, windows, frames))

    run_logger().info(
        "ingested %d samples (%d new) of %d metrics from %s in %d queries",
        report.samples_seen,
        report.samples_added,
        report.metrics,
        report.server,
        report.queries,
    )
    return asdict(report)
