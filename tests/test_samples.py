"""Reading Prometheus dumps and keeping their samples in the DuckDB store."""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from storage.dumps import SAMPLE_SCHEMA, DumpFormatError, dump_to_frame, read_dump
from storage.samples import SampleFrameError, SampleStore

LABELS = {"__name__": "kepler_node_package_joules_total", "instance": "n1", "package": "0"}


def series(labels: dict[str, Any], pairs: list[Any]) -> dict[str, Any]:
    return {"metric": labels, "values": pairs}


def small_dump() -> dict[str, Any]:
    return {
        "kepler_node_package_joules_total": [
            series(LABELS, [[100, "1"], [103, "4"], [106, "10"]]),
            series({**LABELS, "instance": "n2"}, [[100, "5"], [103, "6"]]),
        ],
        "kepler_node_info": [series({"instance": "n1"}, [[100, "1"], [103, "1"]])],
    }


def write_json(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj))
    return path


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SampleStore]:
    with SampleStore(tmp_path / "db" / "samples.duckdb") as opened:
        yield opened


def test_dump_becomes_long_frame_with_canonical_labels() -> None:
    frame = dump_to_frame(small_dump())

    assert frame.schema == pl.Schema(SAMPLE_SCHEMA)
    assert frame.height == 7
    first = frame.row(0, named=True)
    assert first["labels"] == '{"instance":"n1","package":"0"}'
    assert first["metric"] == "kepler_node_package_joules_total"


def test_series_id_is_stable_across_runs_and_label_order() -> None:
    reordered = {"instance": "n1", "container_id": "c", "__name__": "x"}
    frame = dump_to_frame({"kepler_container_cache_miss_total": [series(reordered, [[1, "2"]])]})

    # A fixed number: any change of hashing would split stored series from new ones.
    assert frame["series_id"].to_list() == [-1414834766259789521]


def test_read_dump_reads_gzip_and_plain_json(tmp_path: Path) -> None:
    plain = write_json(tmp_path / "dump.json", small_dump())
    packed = tmp_path / "dump.json.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))

    assert read_dump(plain).equals(read_dump(packed))


def test_prometheus_special_values_parse() -> None:
    pairs = [[1, "NaN"], [2, "+Inf"], [3, "-Inf"], [4, "1e3"]]
    frame = dump_to_frame({"m": [series({}, pairs)]})

    values = frame["value"].to_list()
    assert math.isnan(values[0])
    assert values[1:] == [math.inf, -math.inf, 1000.0]


def test_identical_duplicate_samples_are_one_sample() -> None:
    repeated = series(LABELS, [[100, "1"], [100, "1"], [103, "4"]])
    frame = dump_to_frame({"kepler_node_package_joules_total": [repeated, repeated]})

    assert frame["timestamp"].to_list() == [100.0, 103.0]


def test_conflicting_duplicate_samples_are_rejected() -> None:
    with pytest.raises(DumpFormatError, match="conflicting"):
        dump_to_frame({"m": [series(LABELS, [[100, "1"], [100, "2"]])]})


@pytest.mark.parametrize(
    "dump",
    [
        [],
        {"m": {"metric": {}, "values": []}},
        {"m": [{"metric": {}}]},
        {"m": [series({}, [[1, "2", 3]])]},
        {"m": [series({}, [1, 2])]},
        {"m": [series({}, [[1, "two"]])]},
        {"m": [series({}, [[None, "2"]])]},
        {"m": [series({"instance": 3}, [[1, "2"]])]},
    ],
    ids=["list", "result-object", "no-values", "triple", "flat", "word", "no-time", "int-label"],
)
def test_malformed_dump_raises_dump_format_error(dump: Any) -> None:
    with pytest.raises(DumpFormatError):
        dump_to_frame(dump)


def test_ingesting_the_same_dump_twice_adds_nothing(store: SampleStore, idle_dump: Path) -> None:
    first = store.ingest_dump(idle_dump)
    count = store.count_samples()
    second = store.ingest_dump(idle_dump)

    assert first.samples_added == first.samples_seen == count > 0
    assert second.samples_seen == first.samples_seen
    assert second.samples_added == 0
    assert store.count_samples() == count


def test_loads_are_recorded_and_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "samples.duckdb"
    dump = write_json(tmp_path / "dump.json", small_dump())
    with SampleStore(path) as store:
        store.ingest_dump(dump)
        store.ingest(dump_to_frame(small_dump()), origin="http")

    with SampleStore(path) as reopened:
        history = reopened.load_history()

    assert [(h.origin, h.samples_seen, h.samples_added) for h in history] == [
        (str(dump), 7, 7),
        ("http", 7, 0),
    ]
    assert history[0].load_id < history[1].load_id
    assert history[0].loaded_at is not None


def test_malformed_dump_leaves_store_untouched(store: SampleStore, tmp_path: Path) -> None:
    store.ingest(dump_to_frame(small_dump()), origin="first")
    broken = write_json(tmp_path / "broken.json", {"m": [series({}, [[1, "x"]])]})

    with pytest.raises(DumpFormatError):
        store.ingest_dump(broken)

    assert store.count_samples() == 7
    assert len(store.load_history()) == 1


def test_not_json_raises_dump_format_error(store: SampleStore, tmp_path: Path) -> None:
    broken = tmp_path / "broken.json.gz"
    broken.write_bytes(b"not gzip at all")

    with pytest.raises(DumpFormatError):
        store.ingest_dump(broken)
    assert store.count_samples() == 0


def test_failure_inside_ingest_rolls_everything_back(
    store: SampleStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: Any) -> int:
        raise RuntimeError("disk gone")

    monkeypatch.setattr(store, "_record_load", fail)
    with pytest.raises(RuntimeError):
        store.ingest(dump_to_frame(small_dump()), origin="doomed")

    assert store.count_samples() == 0
    assert store.load_history() == []


def test_frame_without_sample_columns_is_rejected(store: SampleStore) -> None:
    with pytest.raises(SampleFrameError, match="series_id"):
        store.ingest(pl.DataFrame({"metric": ["m"], "timestamp": [1.0]}), origin="bad")
    assert store.load_history() == []


def test_samples_round_trip_and_filters(store: SampleStore) -> None:
    original = dump_to_frame(small_dump())
    store.ingest(original, origin="test")

    everything = store.samples()
    assert everything.schema == original.schema
    assert everything.sort("series_id", "timestamp").equals(original.sort("series_id", "timestamp"))

    node_info = store.samples(metrics=["kepler_node_info"])
    assert node_info["metric"].unique().to_list() == ["kepler_node_info"]
    assert store.samples(instance="n2")["value"].to_list() == [5.0, 6.0]
    assert store.samples(start=103, end=103).height == 3
    assert store.samples(metrics=[]).height == 0


def test_time_range_and_retention(store: SampleStore) -> None:
    assert store.time_range() is None
    store.ingest(dump_to_frame(small_dump()), origin="test")
    assert store.time_range() == (100.0, 106.0)

    deleted = store.delete_before(103)

    assert deleted == 3
    assert store.count_samples() == 4
    assert store.time_range() == (103.0, 106.0)
