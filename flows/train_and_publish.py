"""The part every training flow shares: from extracted rows to a published pipeline version.

A plain function that calls tasks, so it runs inside whichever flow calls it and its tasks
show up in that flow run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.leaderboard import publish_leaderboard, record_results
from flows.tasks import (
    TrainingReport,
    fit_all,
    isolation_arguments,
    node_type_of_instances,
    plan_fits,
    publish_models,
    published_node_type_index,
    resolve_node_types,
)
from modelling.extract import Extraction
from modelling.isolate import isolator_name

DEFAULT_TRAINERS = ["SGDRegressorTrainer", "GradientBoostingRegressorTrainer"]


def trainers_or_default(names: list[str] | None) -> list[str]:
    """The trainers asked for; None (not given) means the defaults, an empty list none."""
    return list(DEFAULT_TRAINERS) if names is None else names


@dataclass(frozen=True)
class TrainingPlan:
    """What to train and where to publish it; the flows' shared parameters."""

    pipeline: str
    model_path: Path
    abs_trainers: list[str] = field(default_factory=lambda: list(DEFAULT_TRAINERS))
    dyn_trainers: list[str] = field(default_factory=lambda: list(DEFAULT_TRAINERS))
    isolator: str = "MinIdleIsolator"
    isolator_args: dict[str, Any] = field(default_factory=dict)
    idle: str | None = None
    node_type: int = 0
    machine_spec: dict[str, Any] | None = None
    node_type_index: dict[str, Any] | None = None
    error_key: str = "mae"


def train_and_publish(
    plan: TrainingPlan,
    extraction: Extraction,
    report: TrainingReport,
    metadata: dict[str, Any],
) -> None:
    """Assign node types, isolate, fit every trainer, publish, and fill in ``report``."""
    report.skipped_groups = dict(extraction.skipped_groups)
    report.mappings = dict(extraction.mappings)
    instances = sorted(extraction.node["instance"].unique())
    node_type, machine_spec, index = resolve_node_types(
        plan.model_path / plan.pipeline,
        instances,
        plan.node_type,
        plan.machine_spec,
        plan.node_type_index,
    )
    isolator_args = isolation_arguments(
        plan.isolator,
        plan.isolator_args,
        plan.idle,
        extraction.source,
        node_type,
        index,
        plan.abs_trainers,
    )
    jobs = plan_fits(
        extraction,
        plan.abs_trainers,
        plan.dyn_trainers,
        plan.isolator,
        isolator_args,
        node_type,
        machine_spec,
        index,
    )
    started, cpu_started = time.perf_counter(), time.process_time()
    results = fit_all(jobs)
    report.timings["fan_out_seconds"] = round(time.perf_counter() - started, 4)
    report.timings["fan_out_cpu_seconds"] = round(time.process_time() - cpu_started, 4)
    record_results(report, results, plan.error_key)

    metadata = {
        "isolator": isolator_name(plan.isolator),
        "extractor": "default",
        "abs_trainers": plan.abs_trainers,
        "dyn_trainers": plan.dyn_trainers,
        "feature_mappings": report.mappings,
        "error_key": plan.error_key,
        **metadata,
    }
    assigned = node_type_of_instances(instances, node_type, index)
    published_index = published_node_type_index(assigned, index, node_type, machine_spec)
    version, path = publish_models(
        plan.model_path, plan.pipeline, results, metadata, published_index
    )
    report.version, report.path = version, str(path or "")
    publish_leaderboard(report, plan.error_key)
