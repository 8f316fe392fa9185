"""The trainer catalogue on small real data: the 2023 Kepler dump's CounterOnly rows."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.ensemble import GradientBoostingRegressor

from flows.tasks import plan_fits
from modelling.components import ConstantComponent
from modelling.extract import extract
from modelling.power_model import PowerModel
from modelling.trainers import TRAINERS, FitError, make_trainer
from modelling.trainers.gradient_boosting import as_tree_ensemble
from modelling.trainers.logistic import LogisticRegressionTrainer
from modelling.training import TrainingSet, train_model
from modelling.vocabulary import (
    CURVE_FIT_TRAINERS,
    LINEAR_WEIGHT_TRAINERS,
    TRAINER_NAMES,
    WEIGHT_TRAINERS,
)
from storage.dumps import read_dump

LINEAR_FAMILY = ("SGDRegressorTrainer", "LinearRegressionTrainer")


@pytest.fixture(scope="module")
def sets(workload_dump: Path) -> dict[str, TrainingSet]:
    """CounterOnly rows of the real dump by output type (187 rows, min-idle isolation)."""
    extraction = extract(read_dump(workload_dump))
    jobs = plan_fits.fn(extraction, ["x"], ["x"], "MinIdleIsolator", {}, 0, None)
    return {j.data.output_type: j.data for j in jobs if j.data.feature_group == "CounterOnly"}


@pytest.fixture(scope="module")
def models(sets: dict[str, TrainingSet]) -> dict[tuple[str, str], PowerModel]:
    """Every trainer on both output types, fitted once for the module."""
    return {
        (name, output_type): train_model(make_trainer(name), data)
        for name in TRAINERS
        for output_type, data in sets.items()
    }


def probe_rows(model: PowerModel, count: int = 40) -> np.ndarray:
    """Raw rows from zero to 1.5 times the training maxima, plus an all-zero row."""
    rng = np.random.default_rng(11)
    rows = rng.random((count, len(model.features))) * model.scale * 1.5
    return np.vstack([np.zeros(len(model.features)), rows])


def kepler_watts(trainer: str, weights: dict[str, Any], metrics: list[str], rows: np.ndarray):
    """Kepler's Go formulas on its weight JSON; x_i = value_i / scale_i in request order."""
    watts = {}
    for component, body in weights.items():
        weight = body["All_Weights"]
        variables = weight["Numerical_Variables"]
        x = [
            rows[:, i] / variables[m]["scale"] if variables[m]["scale"] else np.zeros(len(rows))
            for i, m in enumerate(metrics)
        ]
        if "CurveFit_Weights" not in weight:
            total = weight["Bias_Weight"] + sum(
                variables[m]["weight"] * x[i] for i, m in enumerate(metrics)
            )
        elif trainer == "LogarithmicRegressionTrainer":
            a, b, c = weight["CurveFit_Weights"]
            total = a * np.log(b * x[0] + 1) + c
        elif trainer == "ExponentialRegressionTrainer":
            a, b, c = weight["CurveFit_Weights"]
            total = a * np.exp(b * x[0]) + c
        else:
            big_a, x0, k, off = weight["CurveFit_Weights"]
            total = big_a / (1 + np.exp(-k * (x[0] - x0))) + off
        watts[component] = np.asarray(total, dtype=float)
    return watts


def test_the_catalogue_holds_the_ten_trainers_of_the_spec() -> None:
    assert tuple(TRAINERS) == TRAINER_NAMES
    assert all(make_trainer(name).name == name for name in TRAINER_NAMES)


@pytest.mark.parametrize("trainer", TRAINER_NAMES)
def test_trainer_fits_predicts_and_round_trips_through_its_archive(
    trainer: str, models: dict[tuple[str, str], PowerModel], sets: dict[str, TrainingSet]
) -> None:
    model = models[(trainer, "AbsPower")]
    data = sets["AbsPower"]
    archive = model.to_archive()
    with zipfile.ZipFile(io.BytesIO(archive)) as handle:
        suffixes = {Path(name).suffix for name in handle.namelist()}
    assert suffixes <= {".json", ".skops"}

    loaded = PowerModel.from_archive(archive)
    rows = probe_rows(model)
    ours, theirs = model.predict(rows), loaded.predict(rows)
    for component in data.y:
        np.testing.assert_allclose(theirs[component], ours[component], rtol=1e-12, atol=1e-12)
    assert loaded.metadata == model.metadata

    # better than always answering the training mean, on the held-out latest rows
    split = model.metadata["train_rows"]
    truth = data.y["package"][split:]
    constant = np.mean(np.abs(truth - np.mean(data.y["package"][:split])))
    assert model.metadata["package_mae"] < constant


@pytest.mark.parametrize("trainer", TRAINER_NAMES)
def test_predictions_are_never_negative_nor_missing(
    trainer: str, models: dict[tuple[str, str], PowerModel]
) -> None:
    for output_type in ("AbsPower", "DynPower"):
        model = models[(trainer, output_type)]
        rows = np.vstack([probe_rows(model), model.scale * 100.0])
        for watts in model.predict(rows).values():
            assert np.all(np.isfinite(watts)) and np.all(watts >= 0.0)


@pytest.mark.parametrize("trainer", sorted(WEIGHT_TRAINERS))
@pytest.mark.parametrize("output_type", ["AbsPower", "DynPower"])
def test_kepler_formula_on_the_weight_json_gives_our_watts(
    trainer: str, output_type: str, models: dict[tuple[str, str], PowerModel]
) -> None:
    model = PowerModel.from_archive(models[(trainer, output_type)].to_archive())
    weights = json.loads(json.dumps(model.weights()))
    rows = probe_rows(model)
    ours = model.predict(rows)
    for component in ours:
        if trainer in CURVE_FIT_TRAINERS:
            # Kepler feeds a curve its request's first metric: put the curve's feature first.
            first = model.metadata["curve_features"][component]
            metrics = [first, *(f for f in model.features if f != first)]
        else:
            metrics = list(reversed(model.features))  # linear weights are matched by name
        columns = [model.features.index(m) for m in metrics]
        kepler = kepler_watts(trainer, weights, metrics, rows[:, columns])[component]
        np.testing.assert_allclose(np.clip(kepler, 0, None), ours[component], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("trainer", sorted(set(TRAINER_NAMES) - WEIGHT_TRAINERS))
def test_archive_only_trainers_publish_no_weight_json(
    trainer: str, models: dict[tuple[str, str], PowerModel]
) -> None:
    assert models[(trainer, "AbsPower")].weights() is None


@pytest.mark.parametrize("trainer", LINEAR_FAMILY)
def test_linear_dynamic_power_is_zero_without_activity(
    trainer: str, models: dict[tuple[str, str], PowerModel]
) -> None:
    model = models[(trainer, "DynPower")]
    idle = model.predict(np.zeros((1, len(model.features))))
    assert all(watts[0] == 0.0 for watts in idle.values())
    assert model.metadata["through_origin"] is True
    assert model.predict(model.scale[np.newaxis, :])["package"][0] > 10.0


def test_linear_absolute_power_keeps_its_idle_intercept(
    models: dict[tuple[str, str], PowerModel],
) -> None:
    model = models[("SGDRegressorTrainer", "AbsPower")]
    weights = model.weights()
    assert weights is not None and weights["package"]["All_Weights"]["Bias_Weight"] > 10.0
    dynamic = models[("SGDRegressorTrainer", "DynPower")].weights()
    assert dynamic is not None and dynamic["package"]["All_Weights"]["Bias_Weight"] == 0.0
    assert set(LINEAR_WEIGHT_TRAINERS) == {"SGDRegressorTrainer"}


@pytest.mark.parametrize("trainer", sorted(CURVE_FIT_TRAINERS))
def test_curve_fit_metadata_names_each_components_feature(
    trainer: str, models: dict[tuple[str, str], PowerModel]
) -> None:
    model = models[(trainer, "AbsPower")]
    assert model.metadata["curve"] == make_trainer(trainer).curve
    assert model.metadata["curve_features"]["package"] == "cpu_instructions"
    assert model.metadata["curve_features"]["dram"] == "cache_miss"
    weights = model.weights()
    assert weights is not None
    length = 4 if trainer == "LogisticRegressionTrainer" else 3
    for body in weights.values():
        assert len(body["All_Weights"]["CurveFit_Weights"]) == length
        assert "Bias_Weight" not in body["All_Weights"]


def test_constant_zero_components_are_zero_models_with_zero_error(
    models: dict[tuple[str, str], PowerModel],
) -> None:
    model = models[("XgboostFitTrainer", "AbsPower")]
    for component in ("core", "uncore"):
        assert model.components[component] == ConstantComponent(0.0)
        assert model.metadata[f"{component}_mae"] == 0.0
        assert model.metadata[f"{component}_mape"] == -1.0


def test_model_error_is_the_worst_component_each_on_its_own_held_out_rows() -> None:
    time_steps = np.arange(100, dtype=float)
    x = time_steps[:, np.newaxis] + 1.0
    package = x[:, 0] * 2.0
    dram = x[:, 0] * 0.5
    package[80:] += 100.0  # the latest fifth behaves differently
    dram[80:] += 10.0
    powers = {"package": package, "dram": dram}
    data = TrainingSet(x, powers, ("cpu_instructions",), "CounterOnly", "AbsPower", 0)
    model = train_model(make_trainer("LinearRegressionTrainer"), data)
    assert model.metadata["train_rows"] == 80 and model.metadata["test_rows"] == 20
    assert model.metadata["package_mae"] == pytest.approx(100.0, abs=0.01)
    assert model.metadata["dram_mae"] == pytest.approx(10.0, abs=0.01)
    assert model.metadata["mae"] == model.metadata["package_mae"]
    assert model.metadata["mape"] == max(
        model.metadata["package_mape"], model.metadata["dram_mape"]
    )


def test_a_curve_fit_that_does_not_converge_is_a_fit_error(sets: dict[str, TrainingSet]) -> None:
    with pytest.raises(FitError, match="did not converge within 1 evaluations"):
        train_model(LogisticRegressionTrainer(max_evaluations=1), sets["AbsPower"])


def test_a_curve_on_a_feature_that_never_varies_is_a_fit_error() -> None:
    x = np.column_stack([np.arange(30.0), np.full(30, 7.0)])
    features = ("cache_miss", "cpu_instructions")
    data = TrainingSet(x, {"package": np.arange(30.0)}, features, "CounterOnly", "AbsPower", 0)
    with pytest.raises(FitError, match="cpu_instructions does not vary"):
        train_model(make_trainer("ExponentialRegressionTrainer"), data)


def test_gradient_boosting_json_trees_predict_what_scikit_learn_predicts(
    sets: dict[str, TrainingSet],
) -> None:
    data = sets["AbsPower"]
    x = data.x / np.max(np.abs(data.x), axis=0)
    regressor = GradientBoostingRegressor(random_state=0).fit(x, data.y["package"])
    rows = np.vstack([x, np.random.default_rng(3).random((50, x.shape[1])) * 2.0])
    np.testing.assert_allclose(
        as_tree_ensemble(regressor).predict(rows), regressor.predict(rows), rtol=1e-12
    )
