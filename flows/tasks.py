"""The steps of the training flows, each a Prefect task around plain modelling code.

Tasks pass frames and models in memory; none of them caches (hashing frames would cost more
than recomputing them) and none persists results.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError

from modelling.datasets import training_set
from modelling.extract import Extraction, GroupUnavailableError, extract
from modelling.isolate import (
    ISOLATOR_NAMES,
    Isolator,
    isolator_name,
    make_isolator,
    needs_idle_profile,
)
from modelling.machine_spec import MachineSpec
from modelling.node_types import NodeTypeIndex, load_index
from modelling.power_model import PowerModel
from modelling.profile import build_profiles
from modelling.trainers import TRAINERS, FitError, make_trainer
from modelling.training import TrainingSet, train_model
from modelling.vocabulary import OutputType
from storage.dumps import DumpFormatError, read_dump
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

    def describe(self) -> str:
        data = self.data
        return (
            f"{self.trainer} on {self.source}/{data.output_type}/{data.feature_group} "
            f"node type {data.node_type}"
        )


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
    best_models: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    skipped_groups: dict[str, str] = field(default_factory=dict)
    mappings: dict[str, str] = field(default_factory=dict)
    loads: list[dict[str, Any]] = field(default_factory=list)


@task(cache_policy=NO_CACHE)
def ingest_dump(db_path: Path, dump_path: Path) -> tuple[LoadResult, pl.DataFrame]:
    """Store a saved Prometheus dump; returns the load and the dump's samples.

    Training goes on with the dump's own samples: where the store already held a sample of
    the same series and time, it keeps that one, and a corrected dump must not lose to it.
    """
    frame = read_dump(dump_path)
    if frame.is_empty():
        raise DumpFormatError("the dump holds no samples")
    with SampleStore(db_path) as store:
        result = store.ingest(frame, origin=str(dump_path))
    run_logger().info(
        "ingested %s: %d samples seen, %d new",
        dump_path,
        result.samples_seen,
        result.samples_added,
    )
    return result, frame


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


def node_type_of_instances(
    instances: list[str], default: int, node_type_index: dict[str, Any] | None
) -> dict[str, int]:
    """Each Prometheus ``instance`` -> its node type: the index entry whose ``members`` list
    it, else ``default``."""
    member_of = {
        str(member): int(index)
        for index, entry in (node_type_index or {}).items()
        for member in entry.get("members", [])
    }
    return {instance: member_of.get(instance, default) for instance in instances}


def published_node_type_index(
    assigned: dict[str, int],
    node_type_index: dict[str, Any] | None,
    default: int,
    machine_spec: dict[str, Any] | None,
) -> dict[str, Any]:
    """The given index, plus the default node type with the instances that fell into it (an
    entry without members would match any machine spec while holding no model)."""
    index = {str(k): dict(v) for k, v in (node_type_index or {}).items()}
    unlisted = sorted(i for i, t in assigned.items() if t == default)
    if unlisted or not index:
        entry = index.setdefault(str(default), {"attrs": machine_spec or {}, "members": []})
        entry["members"] = sorted({*entry.get("members", []), *unlisted})
    return index


def _split_by_node_type(
    frame: pl.DataFrame, node_types: dict[str, int]
) -> list[tuple[int, pl.DataFrame]]:
    keyed = frame.with_columns(
        pl.col("instance").replace_strict(node_types, return_dtype=pl.Int64).alias("_node_type")
    )
    parts = keyed.partition_by("_node_type", as_dict=True)
    return [(int(nt), parts[(nt,)].drop("_node_type")) for (nt,) in sorted(parts)]


@task(cache_policy=NO_CACHE)
def plan_fits(
    extraction: Extraction,
    abs_trainers: list[str],
    dyn_trainers: list[str],
    isolator: str,
    isolator_args: dict[str, Any],
    node_type: int,
    machine_spec: dict[str, Any] | None,
    node_type_index: dict[str, Any] | None = None,
) -> list[FitJob]:
    """Every (trainer, group, output type, node type) to fit, with its data ready.

    Instances listed as ``members`` of an entry of ``node_type_index`` train that node
    type's models (with its ``attrs`` as machine spec); the others train ``node_type``'s.
    """
    isolate = make_isolator(isolator, **isolator_args)
    instances = sorted(extraction.node["instance"].unique())
    node_types = node_type_of_instances(instances, node_type, node_type_index)
    specs = {int(k): v.get("attrs") for k, v in (node_type_index or {}).items()}
    specs.setdefault(node_type, machine_spec)
    trainers = {OutputType.ABS_POWER: abs_trainers, OutputType.DYN_POWER: dyn_trainers}
    jobs: list[FitJob] = []
    for group, output_type, frame in _output_frames(extraction, isolate):
        features = sorted(c for c in frame.columns if c in set(extraction.features))
        for nt, part in _split_by_node_type(frame, node_types):
            data = training_set(
                part, features, extraction.components, group, output_type.value, nt, specs.get(nt)
            )
            jobs.extend(FitJob(t, extraction.source, data) for t in trainers[output_type])
    run_logger().info(
        "planned %d fits over %d node type(s)", len(jobs), len(set(node_types.values()))
    )
    return jobs


def _output_frames(
    extraction: Extraction, isolate: Isolator
) -> Iterator[tuple[str, OutputType, pl.DataFrame]]:
    """Per valid group: node rows (AbsPower) and isolated container sums (DynPower)."""
    for group in extraction.valid_groups:
        try:
            node_frame = extraction.group_frame(group, "node")
            container_frame = extraction.group_frame(group, "container")
        except GroupUnavailableError as exc:
            run_logger().info("skipping feature group %s: %s", group, exc)
            continue
        features = [c for c in node_frame.columns if c in set(extraction.features)]
        yield group, OutputType.ABS_POWER, node_frame
        dyn_frame = isolate.isolate(container_frame, features, extraction.components)
        yield group, OutputType.DYN_POWER, dyn_frame


@task(cache_policy=NO_CACHE)
def fit_model(job: FitJob) -> FitResult:
    """Fit one model; a fit that fails is a result with its reason, not a crash of the run."""
    try:
        model = train_model(make_trainer(job.trainer), job.data)
    except FitError as exc:
        run_logger().warning("%s failed: %s", job.describe(), exc)
        return FitResult(job, error=str(exc))
    return FitResult(job, model=model, archive=model.to_archive())


def fit_all(jobs: list[FitJob]) -> list[FitResult]:
    """Fit every job on the flow's task runner, costliest first; a crashed task is a failed
    result."""
    jobs = sorted(jobs, key=_fit_cost, reverse=True)
    futures = fit_model.map(jobs)
    results = []
    for job, future in zip(jobs, futures, strict=True):
        outcome = future.result(raise_on_failure=False)
        if isinstance(outcome, FitResult):
            results.append(outcome)
        else:
            run_logger().error("%s crashed: %r", job.describe(), outcome)
            results.append(FitResult(job, error=f"task crashed: {outcome!r}"))
    return results


def _fit_cost(job: FitJob) -> int:
    trainer = TRAINERS.get(job.trainer)
    return trainer.relative_cost if trainer else 0


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


@task(cache_policy=NO_CACHE)
def resolve_node_types(
    published: Path,
    instances: list[str],
    node_type: int,
    machine_spec: dict[str, Any] | None,
    node_type_index: dict[str, Any] | None,
) -> tuple[int, dict[str, Any] | None, dict[str, Any]]:
    """The data's node type, its machine spec and the node type index to train with.

    The index starts from the one given, else the one already published in the pipeline, so
    node types trained before keep their entries. With a machine spec, the node type that
    covers it is used (a new entry when none does) and every instance of the data is its.
    """
    if not machine_spec and node_type_index:
        return node_type, None, node_type_index
    index = NodeTypeIndex.from_json(node_type_index) if node_type_index else load_index(published)
    if not machine_spec:
        return node_type, None, index.to_json()
    node_type, index = index.assign(MachineSpec.from_mapping(machine_spec), members=instances)
    body = index.to_json()
    for key, entry in body.items():
        if int(key) != node_type:
            entry["members"] = [m for m in entry.get("members", []) if m not in instances]
    spec = body[str(node_type)]["attrs"]
    run_logger().info("training data of %s is node type %d: %s", instances, node_type, spec)
    return node_type, spec, body


@task(cache_policy=NO_CACHE)
def isolation_arguments(
    isolator: str,
    isolator_args: dict[str, Any],
    idle: str | None,
    source: str,
    node_type: int,
    node_type_index: dict[str, Any],
    abs_trainers: list[str],
) -> dict[str, Any]:
    """What the isolator needs: for profile and trainer, the idle run's profile of ``source``."""
    args = dict(isolator_args)
    if not needs_idle_profile(isolator):
        return args
    members = {str(m): int(k) for k, e in node_type_index.items() for m in e.get("members", [])}
    if "profile" not in args:
        if not idle:
            raise ValueError(f"isolator {isolator} needs an idle run (--idle, idle_prom_response)")
        profiles = build_profiles(read_dump(Path(idle)), node_type, members)
        if source not in profiles:
            raise ValueError(f"the idle run {idle} holds no energy of source {source}")
        args["profile"] = profiles[source]
    args.setdefault("source", source)
    if isolator_name(isolator) == ISOLATOR_NAMES["ProfileBackgroundIsolator"]:
        args.setdefault("node_type", node_type)
        args.setdefault("instance_node_types", members)
    else:
        args.setdefault("trainers", abs_trainers)
    return args
