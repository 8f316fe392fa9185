"""Fit one power model (all components) and score it on the latest part of the time range."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from modelling.components import ComponentModel, ConstantComponent
from modelling.power_model import PowerModel, max_abs_scale
from modelling.trainers import FitError, Trainer
from modelling.vocabulary import OutputType, main_feature, model_name

HOLDOUT_FRACTION = 0.2


@dataclass(frozen=True)
class TrainingSet:
    """Rows in time order: ``x`` raw features (``features`` order), ``y`` watts per component."""

    x: np.ndarray
    y: dict[str, np.ndarray]
    features: tuple[str, ...]
    feature_group: str
    output_type: str
    node_type: int
    machine_spec: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.x.ndim != 2 or self.x.shape[1] != len(self.features):
            raise ValueError(f"x has shape {self.x.shape}, features {len(self.features)}")
        if not np.all(np.isfinite(self.x)):
            raise ValueError("training features hold NaN or infinite values")
        for component, y in self.y.items():
            if y.shape != (self.x.shape[0],) or not np.all(np.isfinite(y)):
                raise ValueError(f"power of {component} is not one finite value per row")


@dataclass(frozen=True)
class Scores:
    mae: float
    mape: float
    per_component: dict[str, float]


def time_split(n_rows: int, holdout: float = HOLDOUT_FRACTION) -> int:
    """Index where the held-out tail starts; at least one row on each side."""
    if n_rows < 2:
        raise FitError(f"{n_rows} row(s): at least 2 are needed to train and to test")
    return min(n_rows - 1, max(1, round(n_rows * (1.0 - holdout))))


def mean_absolute_percentage_error(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """MAPE in percent over rows whose true value is above 0; -1 when there are none."""
    positive = y_true > 0
    if not positive.any():
        return -1.0
    errors = np.abs(y_pred[positive] - y_true[positive]) / y_true[positive]
    return float(np.mean(errors) * 100.0)


def score(model: PowerModel, x_test: np.ndarray, y_test: dict[str, np.ndarray]) -> Scores:
    """Every component on its own held-out data; the model's error is the worst component's."""
    predicted = model.predict(x_test)
    per_component: dict[str, float] = {}
    for component, truth in y_test.items():
        per_component[f"{component}_mae"] = float(np.mean(np.abs(predicted[component] - truth)))
        per_component[f"{component}_mape"] = mean_absolute_percentage_error(
            truth, predicted[component]
        )
    maes = [v for k, v in per_component.items() if k.endswith("_mae")]
    mapes = [v for k, v in per_component.items() if k.endswith("_mape")]
    return Scores(max(maes), max(mapes), per_component)


def fit_component(
    trainer: Trainer,
    x: np.ndarray,
    y: np.ndarray,
    features: tuple[str, ...],
    main_index: int,
    through_origin: bool = False,
    component: str = "the component",
) -> ComponentModel:
    """A component constant over the training rows (often core, uncore) stays that constant,
    unless that constant is not zero and the model must give zero at zero activity."""
    if np.ptp(y) == 0.0 and (y[0] == 0.0 or not through_origin):
        return ConstantComponent(float(y[0]))
    try:
        return trainer.fit_component(x, y, features, main_index, through_origin=through_origin)
    except (ValueError, RuntimeError, ArithmeticError) as exc:
        raise FitError(f"{trainer.name} failed to fit {component}: {exc}") from exc


def train_model(trainer: Trainer, data: TrainingSet) -> PowerModel:
    """Fit on the earlier rows, score on the latest ones, and describe the result."""
    started = time.perf_counter()
    split = time_split(data.x.shape[0])
    scale = max_abs_scale(data.x[:split])
    x_train = data.x[:split] / scale

    # Dynamic power is split between containers by applying the model to each of them.
    dynamic = data.output_type == OutputType.DYN_POWER.value
    through_origin = dynamic and trainer.honours_through_origin
    components = {}
    curve_features = {}
    for component, y in data.y.items():
        main = main_feature(data.feature_group, component)
        main_index = data.features.index(main) if main in data.features else 0
        components[component] = fit_component(
            trainer, x_train, y[:split], data.features, main_index, through_origin, component
        )
        curve_features[component] = data.features[main_index]

    name = model_name(trainer.name, data.node_type)
    model = PowerModel(name, data.features, scale, components)
    scores = score(model, data.x[split:], {c: y[split:] for c, y in data.y.items()})
    model.metadata = _metadata(trainer, data, name, scores, curve_features)
    model.metadata["fit_seconds"] = round(time.perf_counter() - started, 4)
    model.metadata["train_rows"] = split
    model.metadata["test_rows"] = int(data.x.shape[0] - split)
    return model


def _metadata(
    trainer: Trainer,
    data: TrainingSet,
    name: str,
    scores: Scores,
    curve_features: dict[str, str],
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "model_name": name,
        "model_class": trainer.model_class,
        "model_file": f"{name}.json",
        "features": list(data.features),
        "fe_files": [],
        "output_type": data.output_type,
        "mae": round(scores.mae, 4),
        "mape": round(scores.mape, 4),
        **{k: round(v, 4) for k, v in scores.per_component.items()},
        "trainer": trainer.name,
        "feature_group": data.feature_group,
        "node_type": data.node_type,
    }
    if data.machine_spec:
        metadata["machine_spec"] = data.machine_spec
    metadata["hyperparameters"] = trainer.hyperparameters()
    metadata["through_origin"] = (
        trainer.honours_through_origin and data.output_type == OutputType.DYN_POWER.value
    )
    if trainer.curve:
        metadata["curve"] = trainer.curve
        metadata["curve_features"] = curve_features
    return metadata
