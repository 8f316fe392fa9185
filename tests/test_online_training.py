"""online-training and training from the store, against a real Prometheus holding the 2023 dump.

The store is filled in two runs (first half, then the rest) so that what is trained can only
have come from DuckDB, not from one run's memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from flows.ingest import ingest
from flows.online_training import online_training, train_from_store
from kepler_model.cli import app
from storage.pipelines import current_version
from storage.samples import SampleStore
from tests.prometheus_server import PrometheusServer, backfilled_server, load_dump

DUMP_START, DUMP_END = 1_695_361_425.0, 1_695_361_986.0
MIDDLE = DUMP_START + 3 * 90
TRAINERS = ["SGDRegressorTrainer"]


@pytest.fixture(scope="module")
def prometheus(
    tmp_path_factory: pytest.TempPathFactory, workload_dump: Path
) -> Iterator[PrometheusServer]:
    root = tmp_path_factory.mktemp("prometheus")
    with backfilled_server(root, [load_dump(workload_dump)]) as server:
        yield server


@pytest.fixture(scope="module")
def online_run(
    prometheus: PrometheusServer, tmp_path_factory: pytest.TempPathFactory, prefect_harness: None
) -> tuple[Path, Path, dict[str, Any], dict[str, Any]]:
    """Version 1 trained on the first half; then one online run up to the dump's end."""
    root = tmp_path_factory.mktemp("online")
    db, models = root / "samples.duckdb", root / "models"
    paths: dict[str, Any] = {"db_path": str(db), "model_path": str(models)}
    trainers: dict[str, Any] = {"abs_trainers": TRAINERS, "dyn_trainers": TRAINERS}

    ingest(prometheus=prometheus.url, db_path=str(db), start=DUMP_START, end=MIDDLE)
    first = train_from_store(pipeline="online", **paths, **trainers)
    result = online_training(
        pipeline="online",
        prometheus=prometheus.url,
        training_window="1h",
        data_retention="300s",
        end=DUMP_END,
        **paths,
        **trainers,
    )
    return db, models, first, result


def test_online_run_publishes_a_new_version_trained_on_the_stored_window(online_run) -> None:
    _, models, first, result = online_run

    assert first["version"] == 1
    assert result["ingest"]["start"] == MIDDLE - 3
    assert result["training"]["version"] == 2
    assert current_version(models, "online") == 2
    metadata = json.loads((models / "online" / "metadata.json").read_text())
    assert metadata["data_window"] == {"start": DUMP_START, "end": DUMP_END}
    assert metadata["source_run_id"]
    groups = {m["feature_group"] for m in result["training"]["models"]}
    assert {"CounterOnly", "CounterIRQCombined"} <= groups
    assert result["training"]["failures"] == []


def test_retention_trims_the_store_after_training(online_run) -> None:
    db, _, _, result = online_run

    with SampleStore(db) as store:
        oldest, newest = store.time_range() or (0.0, 0.0)
    assert newest == DUMP_END
    assert DUMP_END - 300 <= oldest < DUMP_END - 290
    assert result["deleted_samples"] > 0


def test_a_run_without_new_samples_trains_nothing(online_run, prometheus: PrometheusServer) -> None:
    db, models, _, _ = online_run

    again = online_training(
        pipeline="online",
        prometheus=prometheus.url,
        db_path=str(db),
        model_path=str(models),
        end=DUMP_END,
    )

    assert again["ingest"]["samples_added"] == 0
    assert again["training"] is None
    assert current_version(models, "online") == 2


def test_cli_ingests_a_window_and_trains_on_the_store(
    prometheus: PrometheusServer, tmp_path: Path, prefect_harness: None
) -> None:
    db, models = tmp_path / "samples.duckdb", tmp_path / "models"
    start_text = datetime.fromtimestamp(DUMP_START, tz=UTC).isoformat()
    runner = CliRunner()

    ingested = runner.invoke(
        app,
        ["ingest", "--prometheus", prometheus.url, "--db", str(db), "--start", start_text]
        + ["--end", str(int(DUMP_END))],
    )
    trained = runner.invoke(
        app,
        ["train", "--db", str(db), "--model-path", str(models), "--pipeline", "from-store"]
        + ["--abs-trainers", TRAINERS[0], "--dyn-trainers", TRAINERS[0]],
    )

    assert ingested.exit_code == 0, ingested.output
    assert f"from {prometheus.url}" in ingested.output
    assert trained.exit_code == 0, trained.output
    assert "pipeline from-store version 1" in trained.output
    assert current_version(models, "from-store") == 1


def test_cli_train_needs_a_dump_or_a_store(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["train", "--model-path", str(tmp_path)])

    assert result.exit_code == 2
    assert "--input" in result.output and "--db" in result.output
