"""Which model won: ranking a training run's models and showing it in Prefect's UI.

Competitors are the models of one feature group, output type and node type; the lowest error
key (``mae`` by default) wins, ties going to the trainer name first in order, as the model
server selects. A missing or negative error (MAPE is -1 where no true value is above 0) ranks
last.
"""

from __future__ import annotations

import re
from typing import Any

from prefect.artifacts import create_table_artifact

from flows.tasks import FitResult, TrainingReport, run_logger


def record_results(report: TrainingReport, results: list[FitResult], error_key: str) -> None:
    """Each result into the report: a model with its errors, or a failure with its reason."""
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
        errors = {"mae": meta["mae"], "mape": meta["mape"], error_key: meta.get(error_key)}
        report.models.append({**where, "model_name": result.model.name, **errors})
    report.best_models = best_models(report.models, error_key)


def error_of(model: dict[str, Any], error_key: str) -> float:
    value = model.get(error_key)
    if not isinstance(value, int | float) or value < 0:
        return float("inf")
    return float(value)


def rank_models(models: list[dict[str, Any]], error_key: str) -> list[dict[str, Any]]:
    """Models with their ``rank`` among competitors (1 is best) and ``behind_best``."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for model in models:
        key = (model["output_type"], model["feature_group"], model["node_type"])
        groups.setdefault(key, []).append(model)
    ranked: list[dict[str, Any]] = []
    for key in sorted(groups):
        rivals = sorted(groups[key], key=lambda m: (error_of(m, error_key), m["trainer"]))
        best = error_of(rivals[0], error_key)
        for rank, model in enumerate(rivals, start=1):
            behind = error_of(model, error_key) - best
            ranked.append({**model, "rank": rank, "behind_best": round(behind, 4)})
    return ranked


def best_models(models: list[dict[str, Any]], error_key: str) -> list[dict[str, Any]]:
    """The winner among each set of competitors, with its lead over the runner-up."""
    ranked = rank_models(models, error_key)
    winners = []
    for position, model in enumerate(ranked):
        if model["rank"] != 1:
            continue
        following = ranked[position + 1] if position + 1 < len(ranked) else None
        runner_up = following if following is not None and following["rank"] == 2 else None
        winners.append(
            {
                "output_type": model["output_type"],
                "feature_group": model["feature_group"],
                "node_type": model["node_type"],
                "model_name": model["model_name"],
                error_key: model.get(error_key),
                "runner_up": runner_up["model_name"] if runner_up else None,
                "lead": runner_up["behind_best"] if runner_up else None,
            }
        )
    return winners


def leaderboard_rows(report: TrainingReport, error_key: str) -> list[dict[str, Any]]:
    """One row per model, best first within its competitors, then one per failure."""
    behind = f"behind_best_{error_key}"
    rows = [
        {
            "feature_group": m["feature_group"],
            "output_type": m["output_type"],
            "node_type": m["node_type"],
            "rank": m["rank"],
            "trainer": m["trainer"],
            "mae": m["mae"],
            "mape": m["mape"],
            behind: m["behind_best"],
            "failure": "",
        }
        for m in rank_models(report.models, error_key)
    ]
    for failure in report.failures:
        rows.append(
            {
                **{k: failure[k] for k in ("feature_group", "output_type", "node_type")},
                "rank": None,
                "trainer": failure["trainer"],
                "mae": None,
                "mape": None,
                behind: None,
                "failure": failure["reason"],
            }
        )
    return rows


def publish_leaderboard(report: TrainingReport, error_key: str) -> None:
    """The leaderboard as a Prefect table artifact keyed by the pipeline (inside a flow run)."""
    rows = leaderboard_rows(report, error_key)
    key = re.sub(r"[^a-z0-9-]+", "-", f"leaderboard-{report.pipeline}".lower())
    create_table_artifact(
        table=rows or [{"result": "no model trained"}],
        key=key,
        description=f"Models trained for pipeline {report.pipeline}, best first by {error_key}",
    )
    run_logger().info("trained %d models, %d failed", len(report.models), len(report.failures))
