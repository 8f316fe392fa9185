"""Fitted per-component power models and their safe on-disk forms.

A component model maps scaled feature rows to watts for one component (package, dram, ...).
Each kind knows how to write itself to bytes and how it is read back; none uses pickle:
linear, curve-fit and constant models are JSON, scikit-learn estimators are skops files read
with an explicit list of trusted types, XGBoost boosters use XGBoost's own JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


class ModelFileError(ValueError):
    """A model file that is malformed, unsafe or of an unknown kind."""


class ComponentModel(Protocol):
    """What every fitted component offers."""

    def predict(self, x: np.ndarray) -> np.ndarray: ...

    def file_suffix(self) -> str: ...

    def to_bytes(self) -> bytes: ...


@dataclass(frozen=True)
class ConstantComponent:
    """A component that never changes in the training data (often core/uncore): predicts it."""

    value: float

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.full(x.shape[0], self.value, dtype=float)

    def file_suffix(self) -> str:
        return ".json"

    def to_bytes(self) -> bytes:
        return json.dumps({"kind": "constant", "value": self.value}).encode()


@dataclass(frozen=True)
class LinearComponent:
    """P = intercept + sum(coef_i * x_i) on scaled features."""

    intercept: float
    coef: tuple[float, ...]

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=float) @ np.asarray(self.coef, dtype=float) + self.intercept

    def file_suffix(self) -> str:
        return ".json"

    def to_bytes(self) -> bytes:
        body = {"kind": "linear", "intercept": self.intercept, "coef": list(self.coef)}
        return json.dumps(body).encode()


def _logarithmic(x: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    return np.asarray(a * np.log(b * x + 1.0) + c)


def _exponential(x: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    return np.asarray(a * np.exp(b * x) + c)


def _logistic(x: np.ndarray, big_a: float, x0: float, k: float, off: float) -> np.ndarray:
    return np.asarray(big_a / (1.0 + np.exp(-k * (x - x0))) + off)


CURVES = {
    "logarithmic": _logarithmic,
    "exponential": _exponential,
    "logistic": _logistic,
}


@dataclass(frozen=True)
class CurveComponent:
    """A one-feature curve, evaluated on the scaled main feature as Kepler does."""

    curve: str
    params: tuple[float, ...]
    feature: str
    feature_index: int

    def predict(self, x: np.ndarray) -> np.ndarray:
        column = np.asarray(x, dtype=float)[:, self.feature_index]
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return CURVES[self.curve](column, *self.params)

    def file_suffix(self) -> str:
        return ".json"

    def to_bytes(self) -> bytes:
        body = {
            "kind": "curvefit",
            "curve": self.curve,
            "params": list(self.params),
            "feature": self.feature,
            "feature_index": self.feature_index,
        }
        return json.dumps(body).encode()


# Types beyond skops' defaults that our scikit-learn trainers produce. Anything else in a
# file is refused: the list is the contract of what we are willing to load.
TRUSTED_SKOPS_TYPES: tuple[str, ...] = (
    "sklearn.tree._tree.Tree",
    "sklearn.metrics._dist_metrics.EuclideanDistance64",
    "sklearn.neighbors._kd_tree.KDTree",
    "sklearn.neighbors._ball_tree.BallTree",
)


@dataclass(frozen=True)
class SkopsComponent:
    """A fitted scikit-learn regressor."""

    estimator: Any

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.estimator.predict(np.asarray(x, dtype=float)), dtype=float)

    def file_suffix(self) -> str:
        return ".skops"

    def to_bytes(self) -> bytes:
        import skops.io as sio

        return bytes(sio.dumps(self.estimator))


@dataclass(frozen=True)
class XgboostComponent:
    """A fitted XGBoost regressor, kept as a booster."""

    booster: Any

    def predict(self, x: np.ndarray) -> np.ndarray:
        import xgboost

        matrix = xgboost.DMatrix(np.asarray(x, dtype=float))
        return np.asarray(self.booster.predict(matrix), dtype=float)

    def file_suffix(self) -> str:
        return ".xgb.json"

    def to_bytes(self) -> bytes:
        return bytes(self.booster.save_raw(raw_format="json"))


def _load_json_component(data: bytes) -> ComponentModel:
    try:
        body = json.loads(data)
        kind = body["kind"]
        if kind == "constant":
            return ConstantComponent(float(body["value"]))
        if kind == "linear":
            return LinearComponent(float(body["intercept"]), tuple(map(float, body["coef"])))
        if kind == "curvefit" and body["curve"] in CURVES:
            return CurveComponent(
                body["curve"],
                tuple(map(float, body["params"])),
                str(body["feature"]),
                int(body["feature_index"]),
            )
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelFileError(f"malformed component JSON: {exc}") from exc
    raise ModelFileError(f"unknown component kind {body.get('kind')!r}")


def _load_skops_component(data: bytes) -> ComponentModel:
    import skops.io as sio

    untrusted = set(sio.get_untrusted_types(data=data)) - set(TRUSTED_SKOPS_TYPES)
    if untrusted:
        raise ModelFileError(f"skops file holds untrusted types: {sorted(untrusted)}")
    return SkopsComponent(sio.loads(data, trusted=list(TRUSTED_SKOPS_TYPES)))


def _load_xgboost_component(data: bytes) -> ComponentModel:
    import xgboost

    booster = xgboost.Booster()
    try:
        booster.load_model(bytearray(data))
    except xgboost.core.XGBoostError as exc:
        raise ModelFileError(f"malformed XGBoost model: {exc}") from exc
    return XgboostComponent(booster)


def load_component(filename: str, data: bytes) -> ComponentModel:
    """Read a component file by its suffix; pickles and unknown formats are refused."""
    if filename.endswith(".xgb.json"):
        return _load_xgboost_component(data)
    if filename.endswith(".json"):
        return _load_json_component(data)
    if filename.endswith(".skops"):
        return _load_skops_component(data)
    raise ModelFileError(
        f"refusing model file {filename!r}: only .json, .skops and .xgb.json are loaded "
        "(pickles are never unpickled)"
    )
