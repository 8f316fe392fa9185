"""offline-training: a saved Prometheus dump in, a published pipeline out.

Every (trainer, feature group, output type, node type) is one ``fit_model`` task, mapped over
the flow's task runner: threads by default, Dask when the caller passes
``make_task_runner("dask", address)`` through ``with_options``. A fit that fails, or a task
that crashes, becomes a failure with its reason in the flow's result; the other models are
published.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow

from flows.tasks import TrainingReport, extract_features, ingest_dump
from flows.train_and_publish import TrainingPlan, train_and_publish, trainers_or_default
from kepler_model.settings import load_settings
from modelling.isolate import isolator_class_name
from modelling.vocabulary import normalise_source


@flow(name="offline-training")
def offline_training(
    input: str,
    pipeline: str = "kepler-default",
    energy_source: str = "rapl-sysfs",
    abs_trainers: list[str] | None = None,
    dyn_trainers: list[str] | None = None,
    isolator: str = "MinIdleIsolator",
    isolator_args: dict[str, Any] | None = None,
    idle: str | None = None,
    model_path: str | None = None,
    db_path: str | None = None,
    node_type: int = 0,
    machine_spec: dict[str, Any] | None = None,
    thirdparty_metrics: list[str] | None = None,
    node_type_index: dict[str, Any] | None = None,
    error_key: str = "mae",
) -> dict[str, Any]:
    """Ingest the dump, extract, isolate, fit every trainer and publish the pipeline.

    ``node_type_index`` (the published file's shape) assigns Prometheus instances to node
    types by its ``members``; instances it does not list are of ``node_type``. The best model
    per feature group, output type and node type is the one lowest in ``error_key``.
    """
    # Left out, the stores are the settings' (MODEL_PATH, DUCKDB_PATH), as a worker has them.
    settings = load_settings(model_path=model_path, duckdb_path=db_path)
    db = settings.duckdb_path
    source = normalise_source(energy_source)
    plan = TrainingPlan(
        pipeline=pipeline,
        model_path=settings.model_path,
        abs_trainers=trainers_or_default(abs_trainers),
        dyn_trainers=trainers_or_default(dyn_trainers),
        isolator=isolator_class_name(isolator),
        isolator_args=isolator_args or {},
        idle=idle,
        node_type=node_type,
        machine_spec=machine_spec,
        node_type_index=node_type_index,
        error_key=error_key,
    )
    report = TrainingReport(pipeline=pipeline)

    load, samples = ingest_dump(db, Path(input))
    report.loads = [asdict(load)]
    if idle:
        idle_load, _ = ingest_dump(db, Path(idle))
        report.loads.append(asdict(idle_load))
    start, end = float(samples["timestamp"].min()), float(samples["timestamp"].max())  # type: ignore[arg-type]

    extraction = extract_features(samples, source, tuple(thirdparty_metrics or ()))
    train_and_publish(plan, extraction, report, {"data_window": {"start": start, "end": end}})
    return asdict(report)
