"""Prometheus ``query_range`` dumps turned into one long frame of samples.

A dump is a JSON object: metric name -> the ``result`` array of the Prometheus API, each entry
``{"metric": {labels}, "values": [[unix_ts, "string value"], ...]}``. Every sample becomes one
row of ``metric, labels, series_id, timestamp, value``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from storage.json_cursor import JsonCursor

# A series' metric and labels repeat on each of its samples: as categoricals they cost four
# bytes a sample instead of the text (over 400 bytes a sample for Kepler's label sets).
SAMPLE_SCHEMA = pl.Schema(
    {
        "metric": pl.Categorical(),
        "labels": pl.Categorical(),
        "series_id": pl.Int64(),
        "timestamp": pl.Float64(),
        "value": pl.Float64(),
    }
)


class DumpFormatError(ValueError):
    """A dump that is not metric name -> Prometheus ``result`` array."""


def canonical_labels(labels: Mapping[str, str]) -> str:
    """The label set as compact JSON with sorted keys, ``__name__`` left out."""
    kept = {k: v for k, v in labels.items() if k != "__name__"}
    return json.dumps(kept, sort_keys=True, separators=(",", ":"))


def series_id(metric: str, labels: str) -> int:
    """A signed 64-bit id of a series, the same in every process (unlike ``hash``)."""
    digest = hashlib.blake2b(f"{metric}\x00{labels}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, byteorder="big", signed=True)


def read_dump(path: Path) -> pl.DataFrame:
    """Read a ``.json`` or ``.json.gz`` dump into the long sample frame.

    The text is decoded one series at a time: a dump of hundreds of megabytes would take
    several times its size as Python objects if it were decoded whole.
    """
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as stream:
            text = stream.read()
        series = _stream_series(JsonCursor(text))
    except DumpFormatError:
        raise
    except (ValueError, gzip.BadGzipFile, EOFError) as error:
        raise DumpFormatError(f"{path} is not a JSON dump: {error}") from error
    return _columns(_deduplicate(series))


def _stream_series(cursor: JsonCursor) -> list[_Series]:
    if cursor.peek() != "{":
        raise DumpFormatError("a dump is a JSON object of metric -> result")
    series: list[_Series] = []
    for metric in cursor.members():
        if cursor.peek() != "[":
            _result_list(metric, cursor.value())  # raises, naming what the result is
        _result_list(metric, [])
        for index, _ in enumerate(cursor.items()):
            series.append(_parse_series(metric, index, cursor.value()))
    cursor.end()
    return series


def dump_to_frame(obj: Any) -> pl.DataFrame:
    """Turn a parsed dump into the long sample frame; identical duplicate samples appear once."""
    if not isinstance(obj, dict):
        raise DumpFormatError(f"a dump is a JSON object of metric -> result, not {_kind(obj)}")

    series: list[_Series] = [
        _parse_series(metric, index, entry)
        for metric, result in obj.items()
        for index, entry in enumerate(_result_list(metric, result))
    ]
    return _columns(_deduplicate(series))


@dataclass(frozen=True)
class _Series:
    metric: str
    labels: str
    timestamps: np.ndarray
    values: np.ndarray


def _result_list(metric: Any, result: Any) -> list[Any]:
    if not isinstance(metric, str) or not metric:
        raise DumpFormatError(f"metric names are non-empty strings, not {metric!r}")
    if not isinstance(result, list):
        raise DumpFormatError(f"{metric}: the result is a list of series, not {_kind(result)}")
    return result


def _parse_series(metric: str, index: int, entry: Any) -> _Series:
    where = f"{metric}[{index}]"
    if not isinstance(entry, dict) or not isinstance(entry.get("values"), list):
        raise DumpFormatError(f"{where}: a series is an object with 'metric' and 'values'")
    labels = canonical_labels(_labels(where, entry.get("metric", {})))
    timestamps, values = _parse_values(where, entry["values"])
    return _Series(metric, labels, timestamps, values)


def _columns(series: list[_Series]) -> pl.DataFrame:
    """One frame for all series: per-sample columns are concatenated, never built row by row."""
    if not series:
        return pl.DataFrame(schema=SAMPLE_SCHEMA)
    counts = np.array([len(s.values) for s in series], dtype=np.int64)
    owner = pl.Series(np.repeat(np.arange(len(series)), counts))
    ids = np.array([series_id(s.metric, s.labels) for s in series], dtype=np.int64)

    return pl.DataFrame(
        {
            "metric": pl.Series([s.metric for s in series], dtype=pl.Categorical).gather(owner),
            "labels": pl.Series([s.labels for s in series], dtype=pl.Categorical).gather(owner),
            "series_id": np.repeat(ids, counts),
            "timestamp": np.concatenate([s.timestamps for s in series]),
            "value": np.concatenate([s.values for s in series]),
        },
        schema=SAMPLE_SCHEMA,
    )


def _labels(where: str, labels: Any) -> dict[str, str]:
    if not isinstance(labels, dict):
        raise DumpFormatError(f"{where}: 'metric' holds the labels as an object")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise DumpFormatError(f"{where}: label names and values are strings")
    return labels


def _parse_values(where: str, pairs: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Timestamps and values of ``[[ts, "v"], ...]``; float() accepts "NaN", "+Inf", "-Inf"."""
    if not pairs:
        return np.empty(0, dtype=np.float64), np.empty(0, dtype=np.float64)
    try:
        table = np.array(pairs, dtype=object)
    except ValueError as error:
        raise DumpFormatError(f"{where}: values are [timestamp, value] pairs") from error
    if table.ndim != 2 or table.shape[1] != 2:
        raise DumpFormatError(f"{where}: values are [timestamp, value] pairs")

    try:
        timestamps = table[:, 0].astype(np.float64)
        values = table[:, 1].astype(np.float64)
    except (TypeError, ValueError) as error:
        raise DumpFormatError(f"{where}: unparsable number: {error}") from error
    if not np.all(np.isfinite(timestamps)):
        raise DumpFormatError(f"{where}: timestamps are finite numbers")
    return timestamps, values


def _deduplicate(series: list[_Series]) -> list[_Series]:
    """One entry per series, in time order; identical repeated samples appear once.

    Done series by series in numpy: a frame-wide ``unique`` over millions of samples needs
    several times the samples' own memory for its hash table.
    """
    merged: dict[tuple[str, str], list[_Series]] = {}
    for entry in series:
        merged.setdefault((entry.metric, entry.labels), []).append(entry)
    return [_unique_samples(parts) for parts in merged.values()]


def _unique_samples(parts: list[_Series]) -> _Series:
    first = parts[0]
    timestamps = np.concatenate([p.timestamps for p in parts])
    values = np.concatenate([p.values for p in parts])
    order = np.argsort(timestamps, kind="stable")
    timestamps, values = timestamps[order], values[order]

    repeated = np.zeros(len(timestamps), dtype=bool)
    repeated[1:] = timestamps[1:] == timestamps[:-1]
    same = (values[1:] == values[:-1]) | (np.isnan(values[1:]) & np.isnan(values[:-1]))
    conflicting = repeated[1:] & ~same
    if conflicting.any():
        at = timestamps[1:][conflicting]
        raise DumpFormatError(
            f"{first.metric}{first.labels} has {len(at)} conflicting values at the same "
            f"timestamps, e.g. at {at[0]}"
        )
    return _Series(first.metric, first.labels, timestamps[~repeated], values[~repeated])


def _kind(obj: Any) -> str:
    return type(obj).__name__
