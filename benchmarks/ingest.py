"""Samples per second into the DuckDB store: from a dump file, and from a live Prometheus.

The bundled 2023 dump is replicated ``--copies`` times (default 10), each copy shifted in time
to follow the previous one, giving one continuous stretch of every series. The same samples
are then
  1. read from a ``.json.gz`` dump file and ingested (``SampleStore.ingest_dump``);
  2. backfilled into a real Prometheus (promtool, as the tests do; not timed) and fetched into
     a fresh store, once by the ``ingest`` flow (Prefect test harness, thread pool; after one
     untimed warm-up run) and once by the same storage calls without Prefect, one metric
     after another.

    python benchmarks/ingest.py [--copies 10] [--max-points 11000]
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import polars as pl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the tests' Prometheus helpers

from storage.prometheus import PrometheusSource, fetch_range, split_window  # noqa: E402
from storage.samples import SampleStore  # noqa: E402
from tests.prometheus_server import backfilled_server, load_dump  # noqa: E402

STEP = 3


def replicated(dump: dict[str, Any], copies: int) -> tuple[dict[str, Any], float, float]:
    """``copies`` back-to-back copies of every series; returns the dump and its time range."""
    times = [float(t) for result in dump.values() for s in result for t, _ in s["values"]]
    first, last = min(times), max(times)
    shift = last - first + STEP
    copied = {
        metric: [
            {
                "metric": series["metric"],
                "values": [
                    [float(t) + k * shift, v] for k in range(copies) for t, v in series["values"]
                ],
            }
            for series in result
        ]
        for metric, result in dump.items()
    }
    return copied, first, last + (copies - 1) * shift


def timed(name: str, samples_of: Callable[[], int]) -> None:
    started = time.perf_counter()
    samples = samples_of()
    seconds = time.perf_counter() - started
    print(f"{name:<44} {samples:>10,} samples {seconds:7.2f} s {samples / seconds:>10,.0f} /s")


def from_file(dump: dict[str, Any], work: Path) -> Callable[[], int]:
    path = work / "replicated.json.gz"
    with gzip.open(path, "wt", encoding="utf-8") as stream:
        json.dump(dump, stream)

    def run() -> int:
        with SampleStore(work / "file.duckdb") as store:
            return store.ingest_dump(path).samples_added

    return run


def with_flow(
    url: str, db: Path, window: tuple[float, float], metrics: list[str], max_points: int
) -> Callable[[], int]:
    def run() -> int:
        from flows.ingest import ingest

        report = ingest(
            prometheus=url,
            db_path=str(db),
            start=window[0],
            end=window[1],
            metrics=metrics,
            max_points=max_points,
        )
        return int(report["samples_added"])

    return run


def without_prefect(
    url: str, db: Path, window: tuple[float, float], metrics: list[str], max_points: int
) -> Callable[[], int]:
    def run() -> int:
        source = PrometheusSource(url)
        with SampleStore(db) as store:
            added = 0
            for metric in metrics:
                for chunk in split_window(metric, *window, STEP, max_points):
                    frame: pl.DataFrame = fetch_range(source, chunk, STEP)
                    added += store.ingest(frame, origin=url).samples_added
            return added

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--max-points", type=int, default=11_000)
    args = parser.parse_args()

    bundled = Path(str(resources.files("kepler_model") / "data" / "kepler_workload_2023.json.gz"))
    dump, first, last = replicated(load_dump(bundled), args.copies)
    metrics = sorted(dump)
    print(f"{args.copies} copies of the 2023 dump: {len(metrics)} metrics, {last - first:.0f} s")

    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        timed("dump file -> DuckDB", from_file(dump, work))
        server = backfilled_server(work / "prometheus", [dump])
        with server, _prefect_harness():
            window = (first, last)
            with_flow(server.url, work / "warm-up.duckdb", (first, first), metrics[:1], 1)()
            flow = with_flow(server.url, work / "flow.duckdb", window, metrics, args.max_points)
            timed("Prometheus -> DuckDB, ingest flow", flow)
            plain = without_prefect(
                server.url, work / "plain.duckdb", window, metrics, args.max_points
            )
            timed("Prometheus -> DuckDB, no Prefect, serial", plain)


def _prefect_harness() -> Any:
    from prefect.testing.utilities import prefect_test_harness

    return prefect_test_harness(server_startup_timeout=120)


if __name__ == "__main__":
    main()
