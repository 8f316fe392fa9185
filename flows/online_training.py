"""online-training: ingest the new window from Prometheus, train on the store, publish, trim.

``store-training`` is the middle step on its own (train on what the DuckDB store holds and
publish a new pipeline version); the CLI's ``train --db`` runs it directly.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from flows.ingest import ingest
from flows.prometheus_tasks import (
    FETCH_RETRIES,
    FETCH_RETRY_DELAY,
    apply_retention,
    training_bounds,
)
from flows.tasks import TrainingReport, extract_features, load_samples, run_logger
from flows.train_and_publish import TrainingPlan, train_and_publish, trainers_or_default
from kepler_model.settings import load_settings
from modelling.isolate import isolator_class_name
from modelling.vocabulary import normalise_source
from storage.prometheus import duration_seconds


@flow(name="online-training")
def online_training(
    pipeline: str | None = None,
    energy_source: str = "rapl-sysfs",
    abs_trainers: list[str] | None = None,
    dyn_trainers: list[str] | None = None,
    isolator: str = "MinIdleIsolator",
    isolator_args: dict[str, Any] | None = None,
    prometheus: str | None = None,
    db_path: str | None = None,
    model_path: str | None = None,
    training_window: str | None = None,
    data_retention: str | None = None,
    node_type: int = 0,
    machine_spec: dict[str, Any] | None = None,
    node_type_index: dict[str, Any] | None = None,
    end: float | None = None,
    retries: int = FETCH_RETRIES,
    retry_delay_seconds: float = FETCH_RETRY_DELAY,
) -> dict[str, Any]:
    """Ingest up to ``end`` (default now), train on the newest TRAINING_WINDOW of the store
    and publish a new pipeline version, then delete samples older than DATA_RETENTION.

    Unset arguments come from the settings. A run that brings no new sample trains nothing.
    Prometheus staying down fails the run; the stored samples are kept, and the next run
    fetches from where the last stored round ended.
    """
    settings = load_settings(
        default_pipeline=pipeline,
        prom_server=prometheus,
        duckdb_path=db_path,
        model_path=model_path,
        training_window=training_window,
        data_retention=data_retention,
    )
    db = str(settings.duckdb_path)
    keep = duration_seconds(settings.data_retention)
    duration_seconds(settings.training_window)  # a malformed window fails before any work

    ingested = ingest(
        prometheus=settings.prom_server,
        db_path=db,
        end=end,
        retries=retries,
        retry_delay_seconds=retry_delay_seconds,
        data_retention=settings.data_retention,
    )

    training: dict[str, Any] | None = None
    if ingested["samples_added"]:
        training = train_from_store(
            pipeline=settings.default_pipeline,
            energy_source=energy_source,
            abs_trainers=abs_trainers,
            dyn_trainers=dyn_trainers,
            isolator=isolator,
            isolator_args=isolator_args,
            db_path=db,
            model_path=str(settings.model_path),
            training_window=settings.training_window,
            node_type=node_type,
            machine_spec=machine_spec,
            thirdparty_metrics=list(settings.thirdparty_metrics),
            node_type_index=node_type_index,
            error_key=settings.error_key,
        )
    else:
        run_logger().info("no new samples from %s; training skipped", settings.prom_server)

    deleted = apply_retention(Path(db), keep)
    return {"ingest": ingested, "training": training, "deleted_samples": deleted}


@flow(name="store-training")
def train_from_store(
    pipeline: str = "kepler-default",
    energy_source: str = "rapl-sysfs",
    abs_trainers: list[str] | None = None,
    dyn_trainers: list[str] | None = None,
    isolator: str = "MinIdleIsolator",
    isolator_args: dict[str, Any] | None = None,
    db_path: str = "./data/kepler.duckdb",
    model_path: str = "./models",
    training_window: str | None = None,
    node_type: int = 0,
    machine_spec: dict[str, Any] | None = None,
    thirdparty_metrics: list[str] | None = None,
    node_type_index: dict[str, Any] | None = None,
    error_key: str = "mae",
) -> dict[str, Any]:
    """Train every trainer on the newest ``training_window`` of stored samples (all of them
    when unset) and publish the models as a new version of ``pipeline``; the other arguments
    mean what they mean for offline-training."""
    source = normalise_source(energy_source)
    plan = TrainingPlan(
        pipeline=pipeline,
        model_path=Path(model_path),
        abs_trainers=trainers_or_default(abs_trainers),
        dyn_trainers=trainers_or_default(dyn_trainers),
        isolator=isolator_class_name(isolator),
        isolator_args=isolator_args or {},
        node_type=node_type,
        machine_spec=machine_spec,
        node_type_index=node_type_index,
        error_key=error_key,
    )
    report = TrainingReport(pipeline=pipeline)
    window = duration_seconds(training_window) if training_window else None

    bounds = training_bounds(Path(db_path), window)
    if bounds is None:
        return asdict(report)
    samples = load_samples(Path(db_path), *bounds)
    extraction = extract_features(samples, source, tuple(thirdparty_metrics or ()))
    metadata = {
        "data_window": {"start": bounds[0], "end": bounds[1]},
        "data_origin": f"sample store {db_path}",
        "source_run_id": str(flow_run.id or ""),
    }
    train_and_publish(plan, extraction, report, metadata)
    return asdict(report)
