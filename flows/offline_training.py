"""offline-training: a saved Prometheus dump in, a published pipeline out.

Every (trainer, feature group, output type, node type) is one ``fit_model`` task, mapped over
the flow's task runner: threads by default, Dask when the caller passes
``make_task_runner("dask", address)`` through ``with_options``. A fit that fails, or a task
that crashes, becomes a failure with its reason in the flow's result; the other models are
published.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow

from flows.leaderboard import publish_leaderboard, record_results
from flows.tasks import (
    TrainingReport,
    extract_features,
    fit_all,
    ingest_dump,
    isolation_arguments,
    load_samples,
    node_type_of_instances,
    plan_fits,
    publish_models,
    published_node_type_index,
    resolve_node_types,
)
from modelling.isolate import isolator_name
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
    node_type_index: dict[str, Any] | None = None,
    error_key: str = "mae",
) -> dict[str, Any]:
    """Ingest the dump, extract, isolate, fit every trainer and publish the pipeline.

    ``node_type_index`` (the published file's shape) assigns Prometheus instances to node
    types by its ``members``; instances it does not list are of ``node_type``. The best model
    per feature group, output type and node type is the one lowest in ``error_key``.
    """
    source = normalise_source(energy_source)
    isolator_label = isolator_name(isolator)
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

    instances = sorted(extraction.node["instance"].unique())
    node_type, machine_spec, node_type_index = resolve_node_types(
        Path(model_path) / pipeline, instances, node_type, machine_spec, node_type_index
    )
    isolator_args = isolation_arguments(
        isolator,
        isolator_args or {},
        idle,
        source,
        node_type,
        node_type_index,
        abs_trainers or DEFAULT_TRAINERS,
    )
    jobs = plan_fits(
        extraction,
        abs_trainers or DEFAULT_TRAINERS,
        dyn_trainers or DEFAULT_TRAINERS,
        isolator,
        isolator_args,
        node_type,
        machine_spec,
        node_type_index,
    )
    started, cpu_started = time.perf_counter(), time.process_time()
    results = fit_all(jobs)
    report.timings["fan_out_seconds"] = round(time.perf_counter() - started, 4)
    report.timings["fan_out_cpu_seconds"] = round(time.process_time() - cpu_started, 4)
    record_results(report, results, error_key)

    metadata = {
        "isolator": isolator_label,
        "extractor": "default",
        "abs_trainers": abs_trainers or DEFAULT_TRAINERS,
        "dyn_trainers": dyn_trainers or DEFAULT_TRAINERS,
        "data_window": {"start": start, "end": end},
        "feature_mappings": report.mappings,
        "error_key": error_key,
    }
    assigned = node_type_of_instances(instances, node_type, node_type_index)
    index = published_node_type_index(assigned, node_type_index, node_type, machine_spec)
    version, path = publish_models(Path(model_path), pipeline, results, metadata, index)
    report.version, report.path = version, str(path or "")
    publish_leaderboard(report, error_key)
    return asdict(report)
