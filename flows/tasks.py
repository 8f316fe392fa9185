"""The steps of the training flows, each a Prefect task around plain modelling code.

Tasks pass frames and models in memory; none of them caches (hashing frames would cost more
than recomputing them) and none persists results.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError

from modelling.datasets import training_set
from modelling.extract import Extraction, GroupUnavailableError, extract
from modelling.isolate import make_isolator
from modelling.power_model import PowerModel
from modelling.trainers import FitError, make_trainer
from modelling.training import TrainingSet, train_model
from modelling.vocabulary import OutputType
from storage.dumps import read_dump
from storage.pipelines import PublishedModel, publish
from storage.samples import LoadResult, SampleStore


def run_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """Prefect's run logger inside a run, the module logger when called directly."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


@dataclass(frozen=True)
class FitJob:
    """One model to fit: a trainer on one feature group, output type and node type."""

    trainer: str
    source: str
    data: TrainingSet


@dataclass(frozen=True)
class FitResult:
    job: FitJob
    model: PowerModel | None = None
    archive: bytes = b""
    error: str = ""


@dataclass
class TrainingReport:
    """What a training run did, JSON-friendly for API replies and flow results."""

    pipeline: str
    version: int | None = None
    path: str = ""
    models: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)
    skipped_groups: dict[str, str] = field(default_factory=dict)
    mappings: dict[str, str] = field(default_factory=dict)
    loads: list[dict[str, Any]] = field(default_factory=list)


@task(cache_policy=NO_CACHE)
def ingest_dump(db_path: Path, dump_path: Path) -> tuple[LoadResult, float, float]:
    """Store a saved Prometheus dump; returns the load and the dump's time range."""
    frame = read_dump(dump_path)
    if frame.is_empty():
        raise ValueError(f"dump {dump_path} holds no samples")
    with SampleStore(db_path) as store:
        result = store.ingest(frame, origin=str(dump_path))
    run_logger().info(
        "ingested %s: %d samples seen, %d new",
        dump_path,
        result.samples_seen,
        result.samples_added,
    )
    return result, float(frame["timestamp"].min()), float(frame["timestamp"].max())  # type: ignore[arg-type]


@task(cache_policy=NO_CACHE)
def load_samples(db_path: Path, start: float | None, end: float | None) -> pl.DataFrame:
    with SampleStore(db_path) as store:
        frame = store.samples(start=start, end=end)
    run_logger().info("read %d samples from %s", frame.height, db_path)
    return frame


@task(cache_policy=NO_CACHE)
def extract_features(
    samples: pl.DataFrame, source: str, thirdparty: tuple[str, ...] = ()
) -> Extraction:
    extraction = extract(samples, source=source, thirdparty=thirdparty)
    logger = run_logger()
    logger.info(
        "extracted %d node rows for %s; valid groups: %s",
        extraction.node.height,
        source,
        ", ".join(extraction.valid_groups) or "none",
    )
    for group, reason in extraction.skipped_groups.items():
        logger.info("skipping feature group %s: %s", group, reason)
    return extraction


@task(cache_policy=NO_CACHE)
def plan_fits(
    extraction: Extraction,
    abs_trainers: list[str],
    dyn_trainers: list[str],
    isolator: str,
    isolator_args: dict[str, Any],
    node_type: int,
    machine_spec: dict[str, Any] | None,
) -> list[FitJob]:
    """Every (trainer, group, output type) to fit, with its data ready."""
    isolate = make_isolator(isolator, **isolator_args)
    jobs: list[FitJob] = []
    for group in extraction.valid_groups:
        try:
            node_frame = extraction.group_frame(group, "node")
            container_frame = extraction.group_frame(group, "container")
        except GroupUnavailableError as exc:
            run_logger().info("skipping feature group %s: %s", group, exc)
            continue
        features = [c for c in node_frame.columns if c in set(extraction.features)]
        dyn_frame = isolate.isolate(container_frame, features, extraction.components)
        for output_type, frame, trainers in (
            (OutputType.ABS_POWER, node_frame, abs_trainers),
            (OutputType.DYN_POWER, dyn_frame, dyn_trainers),
        ):
            data = training_set(
                frame,
                sorted(features),
                extraction.components,
                group,
                output_type.value,
                node_type,
                machine_spec,
            )
            jobs.extend(FitJob(t, extraction.source, data) for t in trainers)
    return jobs


@task(cache_policy=NO_CACHE)
def fit_model(job: FitJob) -> FitResult:
    """Fit one model; a fit that fails is a result with its reason, not a crash of the run."""
    try:
        model = train_model(make_trainer(job.trainer), job.data)
    except FitError as exc:
        run_logger().warning(
            "%s on %s/%s failed: %s",
            job.trainer,
            job.data.output_type,
            job.data.feature_group,
            exc,
        )
        return FitResult(job, error=str(exc))
    return FitResult(job, model=model, archive=model.to_archive())


@task(cache_policy=NO_CACHE)
def publish_models(
    model_path: Path,
    pipeline: str,
    results: list[FitResult],
    pipeline_metadata: dict[str, Any],
    node_type_index: dict[str, Any],
) -> tuple[int | None, Path | None]:
    published = [
        PublishedModel(
            r.job.source, r.job.data.output_type, r.job.data.feature_group, r.model, r.archive
        )
        for r in results
        if r.model is not None
    ]
    if not published:
        run_logger().warning("no model trained; pipeline %s not published", pipeline)
        return None, None
    path = publish(model_path, pipeline, published, pipeline_metadata, node_type_index)
    metadata_version = int(path.name.lstrip("v"))
    return metadata_version, path
