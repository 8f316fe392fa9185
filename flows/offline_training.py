"""offline-training: a saved Prometheus dump in, a published pipeline out."""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact

from flows.tasks import (
    FitResult,
    TrainingReport,
    extract_features,
    fit_model,
    ingest_dump,
    load_samples,
    plan_fits,
    publish_models,
    run_logger,
)
from modelling.isolate import make_isolator
from modelling.vocabulary import normalise_source

DEFAULT_TRAINERS = ["SGDRegressorTrainer", "GradientBoostingRegressorTrainer"]


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
    model_path: str = "./models",
    db_path: str = "./data/kepler.duckdb",
    node_type: int = 0,
    machine_spec: dict[str, Any] | None = None,
    thirdparty_metrics: list[str] | None = None,
) -> dict[str, Any]:
    """Ingest the dump, extract, isolate, fit every trainer and publish the pipeline."""
    source = normalise_source(energy_source)
    isolator_name = make_isolator(isolator, **(isolator_args or {})).name
    report = TrainingReport(pipeline=pipeline)

    loads = [ingest_dump(Path(db_path), Path(input))]
    if idle:
        loads.append(ingest_dump(Path(db_path), Path(idle)))
    report.loads = [asdict(load) for load, _, _ in loads]
    _, start, end = loads[0]

    samples = load_samples(Path(db_path), start, end)
    extraction = extract_features(samples, source, tuple(thirdparty_metrics or ()))
    report.skipped_groups = dict(extraction.skipped_groups)
    report.mappings = dict(extraction.mappings)

    jobs = plan_fits(
        extraction,
        abs_trainers or DEFAULT_TRAINERS,
        dyn_trainers or DEFAULT_TRAINERS,
        isolator,
        isolator_args or {},
        node_type,
        machine_spec,
    )
    results = [future.result() for future in fit_model.map(jobs)]
    _record_results(report, results)

    metadata = {
        "isolator": isolator_name,
        "extractor": "default",
        "abs_trainers": abs_trainers or DEFAULT_TRAINERS,
        "dyn_trainers": dyn_trainers or DEFAULT_TRAINERS,
        "data_window": {"start": start, "end": end},
        "feature_mappings": report.mappings,
    }
    index = {str(node_type): {"attrs": machine_spec or {}, "members": []}}
    version, path = publish_models(Path(model_path), pipeline, results, metadata, index)
    report.version, report.path = version, str(path or "")
    _leaderboard(pipeline, report)
    return asdict(report)


def _record_results(report: TrainingReport, results: list[FitResult]) -> None:
    for result in results:
        data = result.job.data
        where = {
            "trainer": result.job.trainer,
            "feature_group": data.feature_group,
            "output_type": data.output_type,
            "node_type": str(data.node_type),
        }
        if result.model is None:
            report.failures.append({**where, "reason": result.error})
            continue
        meta = result.model.metadata
        report.models.append(
            {**where, "model_name": result.model.name, "mae": meta["mae"], "mape": meta["mape"]}
        )


def _leaderboard(pipeline: str, report: TrainingReport) -> None:
    """The Prefect UI's view of which model won, by feature group and output type."""
    rows = sorted(report.models, key=lambda m: (m["output_type"], m["feature_group"], m["mae"]))
    key = re.sub(r"[^a-z0-9-]+", "-", f"leaderboard-{pipeline}".lower())
    create_table_artifact(
        table=rows or [{"result": "no model trained"}],
        key=key,
        description=f"MAE/MAPE of every model trained for pipeline {pipeline}",
    )
    run_logger().info("trained %d models, %d failed", len(report.models), len(report.failures))
