"""The store of raw Prometheus samples: one DuckDB file, loads recorded, duplicates ignored.

Watermarks record, per Prometheus server and metric, up to which time the samples have been
fetched; they move in the same transaction as the samples they cover, so a failed load leaves
both untouched.

A ``SampleStore`` holds one DuckDB connection and is not thread-safe: give each thread (or
process) its own store, or serialise calls. DuckDB also locks the file, so only one process may
open it for writing at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import duckdb
import polars as pl

from storage.dumps import SAMPLE_SCHEMA, read_dump

logger = logging.getLogger(__name__)

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS series ("
    " series_id BIGINT PRIMARY KEY, metric VARCHAR NOT NULL, labels VARCHAR NOT NULL)",
    "CREATE TABLE IF NOT EXISTS samples ("
    " series_id BIGINT NOT NULL, timestamp DOUBLE NOT NULL, value DOUBLE,"
    " PRIMARY KEY (series_id, timestamp))",
    "CREATE SEQUENCE IF NOT EXISTS load_ids START 1",
    "CREATE TABLE IF NOT EXISTS loads ("
    " load_id BIGINT PRIMARY KEY DEFAULT nextval('load_ids'), origin VARCHAR NOT NULL,"
    " loaded_at TIMESTAMP NOT NULL, samples_seen BIGINT NOT NULL, samples_added BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS watermarks ("
    " server VARCHAR NOT NULL, metric VARCHAR NOT NULL, until DOUBLE NOT NULL,"
    " updated_at TIMESTAMP NOT NULL, PRIMARY KEY (server, metric))",
)

_INCOMING = "incoming_samples"


class SampleFrameError(ValueError):
    """A frame to ingest that lacks the sample columns or their types."""


@dataclass(frozen=True)
class LoadResult:
    """One ingest: how many samples it carried and how many were new (``loaded_at`` in UTC)."""

    load_id: int
    origin: str
    samples_seen: int
    samples_added: int
    loaded_at: datetime | None = None


@dataclass(frozen=True)
class Watermark:
    """Samples of ``metric`` from the Prometheus at ``server`` are stored up to ``until``."""

    server: str
    metric: str
    until: float


class SampleStore:
    """Raw samples in a DuckDB file; see the module note on threads."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._con = duckdb.connect(str(path))
        with self._transaction():
            for statement in _SCHEMA:
                self._con.execute(statement)

    def __enter__(self) -> SampleStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._con.close()

    def ingest(
        self, frame: pl.DataFrame, origin: str, watermarks: Sequence[Watermark] = ()
    ) -> LoadResult:
        """Add the samples not stored yet and move ``watermarks`` forward, all or nothing, and
        record the load. A watermark never moves back."""
        incoming = _checked(frame)
        loaded_at = datetime.now(UTC).replace(tzinfo=None)

        self._con.register(_INCOMING, incoming)
        try:
            with self._transaction():
                self._insert_series()
                added = self._insert_samples()
                load_id = self._record_load(origin, loaded_at, incoming.height, added)
                self._advance(watermarks, loaded_at)
        finally:
            self._con.unregister(_INCOMING)

        result = LoadResult(load_id, origin, incoming.height, added, loaded_at)
        logger.info(
            "load %d from %s: %d samples seen, %d new",
            load_id,
            origin,
            result.samples_seen,
            added,
        )
        return result

    def ingest_dump(self, path: Path) -> LoadResult:
        """Read a dump file and ingest it; a malformed dump raises before anything is written."""
        return self.ingest(read_dump(path), origin=str(path))

    def count_samples(self) -> int:
        return int(self._scalar("SELECT count(*) FROM samples"))

    def load_history(self) -> list[LoadResult]:
        """Every load, oldest first."""
        rows = self._con.sql(
            "SELECT load_id, origin, samples_seen, samples_added, loaded_at FROM loads"
            " ORDER BY load_id"
        ).fetchall()
        return [LoadResult(int(i), o, int(s), int(a), at) for i, o, s, a, at in rows]

    def samples(
        self,
        metrics: Sequence[str] | None = None,
        start: float | None = None,
        end: float | None = None,
        instance: str | None = None,
    ) -> pl.DataFrame:
        """Stored samples as the long frame ``read_dump`` returns, ordered by series and time;
        bounds are inclusive.

        Samples and series are fetched apart and joined here, so that each series' text
        crosses from DuckDB once rather than once per sample.
        """
        conditions, params = _sample_filter(metrics, start, end, instance)
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        points = self._con.sql(
            "SELECT x.series_id, x.timestamp, x.value"
            " FROM samples x JOIN series s USING (series_id)"
            f" {where} ORDER BY x.series_id, x.timestamp",
            params=params,
        ).pl()
        series = self._con.sql("SELECT series_id, metric, labels FROM series").pl()
        labelled = series.cast({"metric": pl.Categorical, "labels": pl.Categorical})
        frame = points.join(labelled, on="series_id", how="left", maintain_order="left")
        return frame.select(list(SAMPLE_SCHEMA)).cast(SAMPLE_SCHEMA)

    def watermarks(self, server: str) -> dict[str, float]:
        """Metric -> time up to which its samples from ``server`` are stored."""
        rows = self._con.execute(
            "SELECT metric, until FROM watermarks WHERE server = $server", {"server": server}
        ).fetchall()
        return {str(metric): float(until) for metric, until in rows}

    def time_range(self) -> tuple[float, float] | None:
        """Earliest and latest stored timestamp; None for an empty store."""
        rows = self._con.sql("SELECT min(timestamp), max(timestamp) FROM samples").fetchall()
        low, high = rows[0]
        return None if low is None else (float(low), float(high))

    def delete_before(self, timestamp: float) -> int:
        """Retention: drop samples older than ``timestamp`` and series left empty."""
        with self._transaction():
            deleted = self._changed(
                "DELETE FROM samples WHERE timestamp < $ts", {"ts": float(timestamp)}
            )
            self._con.execute(
                "DELETE FROM series WHERE series_id NOT IN (SELECT series_id FROM samples)"
            ).fetchall()
        logger.info("retention: %d samples before %s deleted", deleted, timestamp)
        return deleted

    def _insert_series(self) -> None:
        self._con.execute(
            "INSERT INTO series SELECT series_id, any_value(metric), any_value(labels)"
            f" FROM {_INCOMING} GROUP BY series_id ON CONFLICT DO NOTHING"
        ).fetchall()

    def _insert_samples(self) -> int:
        # The store keeps the first value seen for a (series, timestamp): a later dump that
        # overlaps an earlier one adds only what is new.
        return self._changed(
            "INSERT INTO samples SELECT series_id, timestamp, any_value(value)"
            f" FROM {_INCOMING} GROUP BY series_id, timestamp ON CONFLICT DO NOTHING"
        )

    def _record_load(self, origin: str, loaded_at: datetime, seen: int, added: int) -> int:
        rows = self._con.execute(
            "INSERT INTO loads (origin, loaded_at, samples_seen, samples_added)"
            " VALUES ($origin, $at, $seen, $added) RETURNING load_id",
            {"origin": origin, "at": loaded_at, "seen": seen, "added": added},
        ).fetchall()
        return int(rows[0][0])

    def _advance(self, watermarks: Sequence[Watermark], at: datetime) -> None:
        for mark in watermarks:
            self._con.execute(
                "INSERT INTO watermarks VALUES ($server, $metric, $until, $at)"
                " ON CONFLICT (server, metric) DO UPDATE"
                " SET until = greatest(until, excluded.until), updated_at = excluded.updated_at",
                {"server": mark.server, "metric": mark.metric, "until": mark.until, "at": at},
            ).fetchall()

    def _changed(self, statement: str, params: dict[str, Any] | None = None) -> int:
        rows = self._con.execute(statement, params or {}).fetchall()
        return int(rows[0][0]) if rows else 0

    def _scalar(self, query: str) -> Any:
        return self._con.sql(query).fetchall()[0][0]

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """Commit when the block ends normally; roll back whatever it raised, then re-raise."""
        self._con.begin()
        committed = False
        try:
            yield
            self._con.commit()
            committed = True
        finally:
            if not committed:
                self._con.rollback()


def _checked(frame: pl.DataFrame) -> pl.DataFrame:
    missing = [c for c in SAMPLE_SCHEMA if c not in frame.columns]
    if missing:
        raise SampleFrameError(f"sample frame lacks column(s) {', '.join(missing)}")
    selected = frame.select(list(SAMPLE_SCHEMA))
    try:
        return selected.cast(SAMPLE_SCHEMA, strict=True)
    except pl.exceptions.InvalidOperationError as error:
        raise SampleFrameError(f"sample frame has wrong column types: {error}") from error


def _sample_filter(
    metrics: Sequence[str] | None,
    start: float | None,
    end: float | None,
    instance: str | None,
) -> tuple[list[str], dict[str, Any]]:
    conditions: list[str] = []
    params: dict[str, Any] = {}
    if metrics is not None:
        conditions.append("s.metric IN (SELECT unnest($metrics::VARCHAR[]))")
        params["metrics"] = list(metrics)
    if start is not None:
        conditions.append("x.timestamp >= $start")
        params["start"] = float(start)
    if end is not None:
        conditions.append("x.timestamp <= $end")
        params["end"] = float(end)
    if instance is not None:
        conditions.append("json_extract_string(s.labels, '$.instance') = $instance")
        params["instance"] = instance
    return conditions, params
