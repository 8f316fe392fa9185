"""What the three one-feature curve fits share: start values, bounds and a bounded solver.

A curve is fitted on the component's main feature only, scaled to [0, 1] over the training
rows, because that is the one value Kepler's estimator feeds it. Each curve has one or two
"shape" parameters (a rate, a midpoint); for a fixed shape the model is linear in its
amplitude and offset, so every start takes those two from a least-squares line through the
data. Starts are tried best first; the first one from which the solver converges within
``max_evaluations`` wins. None converging is a FitError: reported, never published.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
from scipy.optimize import least_squares

from modelling.components import CURVES, ComponentModel, CurveComponent
from modelling.trainers.base import FitError, Trainer

Bounds = tuple[Sequence[float], Sequence[float]]


class CurveFitTrainer(Trainer):
    """A one-feature curve; subclasses name the curve and give its starts and bounds."""

    model_class = "curvefit"
    curve: ClassVar[str]

    def __init__(self, max_evaluations: int = 1000) -> None:
        self.max_evaluations = max_evaluations

    @abstractmethod
    def starts(self, x: np.ndarray, y: np.ndarray) -> list[tuple[float, ...]]:
        """Start values in the order of the curve's parameters."""

    @abstractmethod
    def bounds(self) -> Bounds:
        """Lower and upper bound of each parameter."""

    def fit_component(
        self,
        x: np.ndarray,
        y: np.ndarray,
        features: tuple[str, ...],
        main_feature_index: int,
        *,
        through_origin: bool = False,
    ) -> ComponentModel:
        feature = features[main_feature_index]
        column = np.asarray(x[:, main_feature_index], dtype=float)
        if np.ptp(column) == 0.0:
            raise FitError(f"{feature} does not vary over the training rows; no curve fits it")
        starts = sorted(self.starts(column, y), key=lambda p: self._cost(column, y, p))
        for start in starts:
            params = self._solve(column, y, start)
            if params is not None:
                return CurveComponent(self.curve, params, feature, main_feature_index)
        raise FitError(
            f"{self.curve} curve on {feature} did not converge within "
            f"{self.max_evaluations} evaluations from {len(starts)} start(s)"
        )

    def _solve(
        self, x: np.ndarray, y: np.ndarray, start: tuple[float, ...]
    ) -> tuple[float, ...] | None:
        lower, upper = (np.asarray(b, dtype=float) for b in self.bounds())
        inside = np.clip(np.asarray(start, dtype=float), lower, upper)
        result = least_squares(
            lambda p: self._residuals(x, y, p),
            inside,
            bounds=(lower, upper),
            method="trf",
            x_scale="jac",
            max_nfev=self.max_evaluations,
        )
        fitted = tuple(float(p) for p in result.x)
        if result.status <= 0 or self._cost(x, y, fitted) == float("inf"):
            return None
        return fitted

    def _residuals(self, x: np.ndarray, y: np.ndarray, params: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            predicted = CURVES[self.curve](x, *params)
        # An overflow mid-search is a very bad point, not a crash of the solver.
        return np.nan_to_num(predicted - y, nan=1e12, posinf=1e12, neginf=-1e12)

    def _cost(self, x: np.ndarray, y: np.ndarray, params: Sequence[float]) -> float:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            cost = float(np.sum((CURVES[self.curve](x, *params) - y) ** 2))
        return cost if np.isfinite(cost) else float("inf")


def amplitude_and_offset(basis: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """The least-squares a and c of y = a * basis + c."""
    design = np.column_stack([basis, np.ones_like(basis)])
    (amplitude, offset), *_ = np.linalg.lstsq(design, y, rcond=None)
    return float(amplitude), float(offset)
