"""The deployments that ``kepler-model flows`` serves, built without a Prefect server."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from flows.serve import build_deployments
from kepler_model.settings import Settings


def test_online_training_is_scheduled_every_sampling_interval(tmp_path: Path) -> None:
    settings = Settings(sampling_interval=120, duckdb_path=tmp_path / "k.duckdb")

    online = {d.name: d for d in build_deployments(settings)}["online-training"]

    assert [s.schedule.interval for s in online.schedules] == [timedelta(seconds=120)]
    assert online.concurrency_limit == 1
    assert online.parameters["db_path"] == str(tmp_path / "k.duckdb")


def test_ingest_and_offline_training_run_on_demand_with_absolute_stores() -> None:
    settings = Settings(model_path=Path("relative/models"))

    found = {d.name: d for d in build_deployments(settings)}

    assert set(found) == {"online-training", "ingest", "offline-training"}
    assert not found["ingest"].schedules and not found["offline-training"].schedules
    assert Path(found["offline-training"].parameters["model_path"]).is_absolute()
    assert Path(found["offline-training"].parameters["input"]).is_file()
