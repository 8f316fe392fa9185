"""The ingest flow against a real Prometheus holding the bundled 2023 dump (backfilled).

The expected samples always come from the dump file itself, read by ``storage.dumps``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from prometheus_api_client import PrometheusConnect
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from flows.ingest import ingest
from storage.dumps import SAMPLE_SCHEMA, dump_to_frame
from storage.prometheus import (
    MAX_POINTS,
    DurationError,
    PrometheusQueryError,
    PrometheusSource,
    QueryWindow,
    duration_seconds,
    fetch_range,
    split_window,
    start_times,
    training_metrics,
)
from storage.samples import SampleStore, Watermark
from tests.conftest import running_server
from tests.prometheus_server import PrometheusServer, backfilled_server, load_dump

DUMP_START, DUMP_END = 1_695_361_425.0, 1_695_361_986.0
EDGE_START = DUMP_START + 86_400  # a day later: apart from the real dump's windows
NODES = ("node-a", "node-b")
FAST_RETRIES: dict[str, Any] = {"retries": 2, "retry_delay_seconds": 0.01}


def edge_dump() -> dict[str, list[dict[str, Any]]]:
    """What the real dump lacks: NaN, label values needing escapes, two Kepler instances."""
    times = [EDGE_START + 3 * i for i in range(6)]
    node = {"mode": "dynamic", "package": "0", "source": "rapl"}
    odd_label = 'say "hi"\\ back\nslash'
    return {
        "kepler_node_package_joules_total": [
            {
                "metric": {**node, "instance": name},
                "values": [[t, str(base + i)] for i, t in enumerate(times)],
            }
            for name, base in zip(NODES, (100.25, 7.5), strict=True)
        ],
        "kepler_container_cpu_cycles_total": [
            {
                "metric": {"container_id": odd_label, "instance": "node-a"},
                "values": [[t, "NaN" if i == 2 else str(1e12 + i)] for i, t in enumerate(times)],
            }
        ],
        "kepler_node_info": [
            {
                "metric": {"instance": "node-a", "cpu_architecture": "Sky Lake"},
                "values": [[t, "1"] for t in times],
            }
        ],
    }


@pytest.fixture(scope="module")
def workload(workload_dump: Path) -> dict[str, Any]:
    return load_dump(workload_dump)


@pytest.fixture(scope="module")
def prometheus(
    tmp_path_factory: pytest.TempPathFactory, workload: dict[str, Any]
) -> Iterator[PrometheusServer]:
    root = tmp_path_factory.mktemp("prometheus")
    with backfilled_server(root, [workload, edge_dump()]) as server:
        yield server


def stored(db: Path, metrics: list[str] | None = None) -> pl.DataFrame:
    with SampleStore(db) as store:
        return store.samples(metrics=metrics)


def expected(dump: dict[str, Any], metrics: list[str], until: float = math.inf) -> pl.DataFrame:
    frame = dump_to_frame({m: dump[m] for m in metrics if m in dump})
    frame = frame.filter(pl.col("timestamp") <= until)
    return frame.sort("series_id", "timestamp")


def run_ingest(server: PrometheusServer, db: Path, **arguments: Any) -> dict[str, Any]:
    report: dict[str, Any] = ingest(prometheus=server.url, db_path=str(db), **arguments)
    return report


def test_server_gives_the_same_samples_as_the_dump_file(
    prometheus: PrometheusServer, workload: dict[str, Any], tmp_path: Path, prefect_harness: None
) -> None:
    metrics = sorted(workload)
    run_ingest(prometheus, tmp_path / "s.duckdb", start=DUMP_START, end=DUMP_END, metrics=metrics)

    assert stored(tmp_path / "s.duckdb").equals(expected(workload, metrics))


def test_nan_escaped_labels_and_instances_survive_the_round_trip(
    prometheus: PrometheusServer, tmp_path: Path, prefect_harness: None
) -> None:
    edge = edge_dump()
    db = tmp_path / "s.duckdb"
    run_ingest(prometheus, db, start=EDGE_START, end=EDGE_START + 60, metrics=sorted(edge))

    frame = stored(db)
    assert frame.equals(expected(edge, sorted(edge)))
    assert frame["value"].is_nan().sum() == 1
    with SampleStore(db) as store:
        per_node = [store.samples(["kepler_node_package_joules_total"], instance=n) for n in NODES]
    assert [f.height for f in per_node] == [6, 6]
    assert per_node[0]["series_id"][0] != per_node[1]["series_id"][0]


def test_default_metrics_are_those_training_reads_and_a_second_run_adds_nothing(
    prometheus: PrometheusServer, workload: dict[str, Any], tmp_path: Path, prefect_harness: None
) -> None:
    db = tmp_path / "s.duckdb"
    first = run_ingest(prometheus, db, start=DUMP_START, end=DUMP_END)
    again = run_ingest(prometheus, db, start=DUMP_START, end=DUMP_END)
    resumed = run_ingest(prometheus, db, end=DUMP_END)

    wanted = [m for m in training_metrics() if m in workload]
    assert stored(db).equals(expected(workload, wanted))
    assert first["samples_added"] == stored(db).height
    assert again["samples_seen"] == first["samples_seen"]
    assert again["samples_added"] == resumed["samples_added"] == 0
    assert resumed["start"] == DUMP_END - 3


def test_two_half_windows_give_the_rows_of_one_whole_window(
    prometheus: PrometheusServer, tmp_path: Path, prefect_harness: None
) -> None:
    middle = DUMP_START + 3 * 90
    metrics = ["kepler_node_dram_joules_total", "kepler_container_cpu_cycles_total"]
    for db, start, end in (
        ("whole", DUMP_START, DUMP_END),
        ("halves", DUMP_START, middle),
        ("halves", middle, DUMP_END),
    ):
        run_ingest(prometheus, tmp_path / f"{db}.duckdb", start=start, end=end, metrics=metrics)

    whole = stored(tmp_path / "whole.duckdb")
    assert whole.height > 0
    assert stored(tmp_path / "halves.duckdb").equals(whole)


def test_a_long_window_is_fetched_in_chunks_with_the_same_result(
    prometheus: PrometheusServer, workload: dict[str, Any], tmp_path: Path, prefect_harness: None
) -> None:
    metrics = ["kepler_node_package_joules_total", "kepler_container_cache_miss_total"]
    db = tmp_path / "s.duckdb"
    report = run_ingest(
        prometheus, db, start=DUMP_START, end=DUMP_END, metrics=metrics, max_points=20
    )

    assert report["rounds"] == 10  # 188 grid times, 20 per query
    assert report["queries"] == 20
    assert stored(db).equals(expected(workload, metrics))


def test_prometheus_stopping_mid_run_fails_after_retries_and_the_next_run_completes(
    prometheus: PrometheusServer,
    workload: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    prefect_harness: None,
) -> None:
    metrics = ["kepler_node_package_joules_total", "kepler_container_cpu_instructions_total"]
    db = tmp_path / "s.duckdb"
    calls = _stop_server_at_call(monkeypatch, prometheus, len(metrics) + 1)
    chunk = {"metrics": metrics, "max_points": 50, **FAST_RETRIES}

    try:
        with pytest.raises(PrometheusQueryError):
            run_ingest(prometheus, db, start=DUMP_START, end=DUMP_END, **chunk)
    finally:
        prometheus.start()

    first_round_end = DUMP_START + 49 * 3
    assert len(calls) == len(metrics) * (1 + 1 + FAST_RETRIES["retries"])
    assert stored(db).equals(expected(workload, metrics, until=first_round_end))
    with SampleStore(db) as store:
        assert store.watermarks(prometheus.url) == dict.fromkeys(metrics, first_round_end)

    report = run_ingest(prometheus, db, end=DUMP_END, **chunk)
    assert report["start"] == first_round_end - 3
    assert stored(db).equals(expected(workload, metrics))


def _stop_server_at_call(
    monkeypatch: pytest.MonkeyPatch, server: PrometheusServer, when: int
) -> list[float]:
    """Stop the real server just before the ``when``-th range query; returns the calls."""
    original = PrometheusConnect.custom_query_range
    calls: list[float] = []

    def stopping(client: PrometheusConnect, *args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs["start_time"].timestamp())
        if len(calls) == when:
            server.stop()
        return original(client, *args, **kwargs)

    monkeypatch.setattr(PrometheusConnect, "custom_query_range", stopping)
    return calls


def test_credentials_and_the_query_reach_prometheus() -> None:
    seen: list[dict[str, str]] = []

    async def query_range(request: Request) -> JSONResponse:
        seen.append({"auth": request.headers.get("authorization", ""), **request.query_params})
        return JSONResponse({"status": "success", "data": {"resultType": "matrix", "result": []}})

    app = Starlette(routes=[Route("/api/v1/query_range", query_range)])
    window = QueryWindow("kepler_node_info", 300.0, 600.0)
    with running_server(app) as url:
        fetch_range(PrometheusSource(url, bearer_token="t0ken"), window, 3)
        fetch_range(PrometheusSource(url, username="kepler", password="pw"), window, 3)

    assert seen[0] == {
        "auth": "Bearer t0ken",
        "query": "kepler_node_info",
        "start": "300",
        "end": "600",
        "step": "3",
    }
    assert seen[1]["auth"] == "Basic a2VwbGVyOnB3"
    assert "t0ken" not in repr(PrometheusSource(url, bearer_token="t0ken"))


def test_refused_queries_raise_prometheus_query_error(prometheus: PrometheusServer) -> None:
    window = QueryWindow("kepler_node_info{", DUMP_START, DUMP_END)
    with pytest.raises(PrometheusQueryError, match="400"):
        fetch_range(PrometheusSource(prometheus.url), window, 3)


def test_windows_are_split_below_the_prometheus_point_limit() -> None:
    week = 7 * 86_400.0
    chunks = split_window("m", 1_000_001.0, 1_000_001.0 + week, 3)

    first, last = 999_999.0, 1_604_799.0  # the 3 s grid times at or before the bounds
    assert (chunks[0].start, chunks[-1].end) == (first, last)
    assert all((w.end - w.start) / 3 + 1 <= MAX_POINTS for w in chunks)
    assert all(b.start == a.end + 3 for a, b in zip(chunks, chunks[1:], strict=False))
    assert len(chunks) == math.ceil(((last - first) / 3 + 1) / MAX_POINTS)


def test_each_metric_resumes_one_step_before_its_watermark() -> None:
    starts = start_times(
        ["a", "b", "c"],
        {"a": 9_000.0, "b": 10.0},
        start=None,
        end=10_000.0,
        step=3,
        first_window=300.0,
        keep=3_600.0,
    )

    assert starts == {"a": 8_997.0, "b": 6_400.0, "c": 9_700.0}


def test_watermarks_move_with_their_samples_and_never_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = pl.DataFrame(schema=SAMPLE_SCHEMA)
    with SampleStore(tmp_path / "s.duckdb") as store:
        store.ingest(empty, "run 1", [Watermark("p1", "a", 600.0), Watermark("p2", "a", 9.0)])
        store.ingest(empty, "run 2", [Watermark("p1", "a", 300.0), Watermark("p1", "b", 60.0)])
        monkeypatch.setattr(store, "_insert_samples", _fail)
        with pytest.raises(OSError):
            store.ingest(empty, "run 3", [Watermark("p1", "a", 900.0)])

        assert store.watermarks("p1") == {"a": 600.0, "b": 60.0}
        assert store.watermarks("p2") == {"a": 9.0}


def _fail(*_: Any) -> int:
    raise OSError("disk gone")


@pytest.mark.parametrize(
    ("text", "seconds"), [("300", 300.0), ("300s", 300.0), ("7d", 604_800.0), ("1h30m", 5_400.0)]
)
def test_durations_read_like_prometheus(text: str, seconds: float) -> None:
    assert duration_seconds(text) == seconds


@pytest.mark.parametrize("text", ["", "7 days", "inf", "-5s", "1h30"])
def test_malformed_durations_are_rejected(text: str) -> None:
    with pytest.raises(DurationError):
        duration_seconds(text)
