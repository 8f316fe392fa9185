"""Fitted per-component power models and their safe on-disk forms.

A component model maps scaled feature rows to watts for one component (package, dram, ...).
Each kind knows how to write itself to bytes and how it is read back; none uses pickle:
linear, polynomial, curve-fit, tree-ensemble and constant models are JSON, other scikit-learn
estimators are skops files read with an explicit list of trusted types, XGBoost boosters use
XGBoost's own JSON.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
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


@dataclass(frozen=True)
class PolynomialComponent:
    """P = intercept + sum(coef_j * prod_i x_i ** powers[j][i]) on scaled features."""

    powers: tuple[tuple[int, ...], ...]
    intercept: float
    coef: tuple[float, ...]

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=float)
        powers = np.asarray(self.powers, dtype=float)
        if powers.ndim != 2 or powers.shape[1] != x.shape[1]:
            raise ValueError(f"polynomial of {powers.shape} terms applied to {x.shape[1]} features")
        terms = np.prod(x[:, np.newaxis, :] ** powers[np.newaxis, :, :], axis=2)
        return terms @ np.asarray(self.coef, dtype=float) + self.intercept

    def file_suffix(self) -> str:
        return ".json"

    def to_bytes(self) -> bytes:
        body = {
            "kind": "polynomial",
            "powers": [list(p) for p in self.powers],
            "intercept": self.intercept,
            "coef": list(self.coef),
        }
        return json.dumps(body).encode()


def _logarithmic(x: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    return np.asarray(a * np.log(b * x + 1.0) + c)


def _exponential(x: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    return np.asarray(a * np.exp(b * x) + c)


def _logistic(x: np.ndarray, big_a: float, x0: float, k: float, off: float) -> np.ndarray:
    return np.asarray(big_a / (1.0 + np.exp(-k * (x - x0))) + off)


CURVES: dict[str, Callable[..., np.ndarray]] = {
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


TREE_ARRAYS: tuple[str, ...] = ("left", "right", "feature", "threshold", "value")


@dataclass(frozen=True, eq=False)
class TreeEnsembleComponent:
    """P = base + rate * (sum of the trees' leaf values): boosted regression trees as JSON.

    Trees are node arrays of shape (trees, nodes), padded with unreachable leaves; a leaf's
    children are -1 and a child's index is always above its parent's, so a walk ends. A row
    goes left where its feature value, rounded to float32 as scikit-learn's trees see it, is
    at most the node's threshold.
    """

    base: float
    rate: float
    left: np.ndarray
    right: np.ndarray
    feature: np.ndarray
    threshold: np.ndarray
    value: np.ndarray

    @classmethod
    def from_trees(
        cls, base: float, rate: float, trees: list[dict[str, list[float] | list[int]]]
    ) -> TreeEnsembleComponent:
        """Validate each tree's node lists and pack them; a malformed tree is a ValueError."""
        if not trees:
            raise ValueError("a tree ensemble needs at least one tree")
        width = max(len(tree["left"]) for tree in trees)
        packed: dict[str, list[np.ndarray]] = {name: [] for name in TREE_ARRAYS}
        for tree in trees:
            arrays = _checked_tree(tree)
            for name in TREE_ARRAYS:
                pad = -1 if name in ("left", "right") else 0
                padded = np.full(width, pad, dtype=arrays[name].dtype)
                padded[: arrays[name].size] = arrays[name]
                packed[name].append(padded)
        stacked = {name: np.stack(packed[name]) for name in TREE_ARRAYS}
        return cls(float(base), float(rate), **stacked)

    def predict(self, x: np.ndarray) -> np.ndarray:
        rows = np.asarray(x, dtype=np.float32).astype(float)
        if rows.ndim != 2 or rows.shape[1] <= int(self.feature.max()):
            raise ValueError(f"trees split on feature {int(self.feature.max())}; x is {rows.shape}")
        trees = np.arange(self.left.shape[0])
        row_index = np.arange(rows.shape[0])[:, np.newaxis]
        node = np.zeros((rows.shape[0], trees.size), dtype=np.intp)
        for _ in range(self.left.shape[1]):
            left = self.left[trees, node]
            internal = left >= 0
            if not internal.any():
                break
            goes_left = rows[row_index, self.feature[trees, node]] <= self.threshold[trees, node]
            step = np.where(goes_left, left, self.right[trees, node])
            node = np.where(internal, step, node)
        return np.asarray(self.base + self.rate * self.value[trees, node].sum(axis=1))

    def file_suffix(self) -> str:
        return ".json"

    def to_bytes(self) -> bytes:
        body = {
            "kind": "tree_ensemble",
            "base": self.base,
            "rate": self.rate,
            "trees": [
                {name: getattr(self, name)[i].tolist() for name in TREE_ARRAYS}
                for i in range(self.left.shape[0])
            ],
        }
        return json.dumps(body).encode()


def _checked_tree(tree: dict[str, list[float] | list[int]]) -> dict[str, np.ndarray]:
    """One tree's arrays, after checking that every walk from the root ends at a leaf."""
    left = np.asarray(tree["left"], dtype=np.intp)
    right = np.asarray(tree["right"], dtype=np.intp)
    feature = np.asarray(tree["feature"], dtype=np.intp)
    threshold = np.asarray(tree["threshold"], dtype=float)
    value = np.asarray(tree["value"], dtype=float)
    size = left.size
    if size == 0 or any(a.shape != (size,) for a in (right, feature, threshold, value)):
        raise ValueError("a tree's node arrays must be non-empty and of one length")
    index = np.arange(size)
    internal = left >= 0
    leaf_ok = (left[~internal] == -1) & (right[~internal] == -1)
    child_ok = (left > index) & (right > index) & (left < size) & (right < size)
    if not leaf_ok.all() or not child_ok[internal].all() or (feature[internal] < 0).any():
        raise ValueError("a tree's children must follow their parent and stay in the tree")
    if not (np.isfinite(threshold).all() and np.isfinite(value).all()):
        raise ValueError("a tree holds a non-finite threshold or value")
    arrays = {"left": left, "right": right, "threshold": threshold, "value": value}
    return {**arrays, "feature": np.where(internal, feature, 0)}


# Types beyond skops' defaults that our scikit-learn trainers produce (k-nearest neighbours'
# search trees; SVR needs none). Anything else in a file is refused: the list is the contract
# of what we are willing to load. Tree stays for gradient-boosting archives written before
# those moved to JSON trees.
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


def _read_constant(body: dict[str, Any]) -> ComponentModel:
    return ConstantComponent(float(body["value"]))


def _read_linear(body: dict[str, Any]) -> ComponentModel:
    return LinearComponent(float(body["intercept"]), tuple(map(float, body["coef"])))


def _read_polynomial(body: dict[str, Any]) -> ComponentModel:
    powers = tuple(tuple(int(p) for p in term) for term in body["powers"])
    coef = tuple(map(float, body["coef"]))
    if len(powers) != len(coef) or len({len(term) for term in powers}) > 1:
        raise ValueError("a polynomial needs one coefficient per term, terms of one width")
    return PolynomialComponent(powers, float(body["intercept"]), coef)


def _read_curve(body: dict[str, Any]) -> ComponentModel:
    if body["curve"] not in CURVES:
        raise ValueError(f"unknown curve {body['curve']!r}; known: {', '.join(CURVES)}")
    return CurveComponent(
        str(body["curve"]),
        tuple(map(float, body["params"])),
        str(body["feature"]),
        int(body["feature_index"]),
    )


def _read_tree_ensemble(body: dict[str, Any]) -> ComponentModel:
    return TreeEnsembleComponent.from_trees(body["base"], body["rate"], body["trees"])


_JSON_READERS = {
    "constant": _read_constant,
    "linear": _read_linear,
    "polynomial": _read_polynomial,
    "curvefit": _read_curve,
    "tree_ensemble": _read_tree_ensemble,
}


def _load_json_component(data: bytes) -> ComponentModel:
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"component file is not JSON: {exc}") from exc
    kind = body.get("kind") if isinstance(body, dict) else None
    reader = _JSON_READERS.get(kind) if isinstance(kind, str) else None
    if reader is None:
        raise ModelFileError(f"unknown component kind {kind!r}")
    try:
        return reader(body)
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelFileError(f"malformed {kind} component: {exc}") from exc


_SKOPS_ERRORS = (zipfile.BadZipFile, ValueError, KeyError, TypeError)


def _load_skops_component(data: bytes) -> ComponentModel:
    import skops.io as sio

    try:
        found = set(sio.get_untrusted_types(data=data))
    except _SKOPS_ERRORS as exc:
        raise ModelFileError(f"not a readable skops file: {exc}") from exc
    untrusted = found - set(TRUSTED_SKOPS_TYPES)
    if untrusted:
        raise ModelFileError(f"skops file holds untrusted types: {sorted(untrusted)}")
    try:
        return SkopsComponent(sio.loads(data, trusted=list(TRUSTED_SKOPS_TYPES)))
    except _SKOPS_ERRORS as exc:
        raise ModelFileError(f"not a readable skops file: {exc}") from exc


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
