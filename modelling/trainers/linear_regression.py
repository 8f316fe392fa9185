"""LinearRegressionTrainer: least squares with non-negative coefficients."""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LinearRegression

from modelling.components import ComponentModel, LinearComponent
from modelling.trainers.base import Trainer


class LinearRegressionTrainer(Trainer):
    """More activity never means less power: every coefficient is at least 0.

    The fit is exact least squares, so unlike SGD it needs no tuning; the model is stored as
    JSON (intercept and coefficients). Kepler gets no weight JSON for it: SPEC section 1
    lists it as an archive-only trainer.
    """

    name = "LinearRegressionTrainer"
    model_class = "scikit"
    honours_through_origin = True

    def __init__(self, positive: bool = True) -> None:
        self.positive = positive

    def fit_component(
        self,
        x: np.ndarray,
        y: np.ndarray,
        features: tuple[str, ...],
        main_feature_index: int,
        *,
        through_origin: bool = False,
    ) -> ComponentModel:
        regressor = LinearRegression(positive=self.positive, fit_intercept=not through_origin)
        regressor.fit(x, y)
        coef = tuple(float(c) for c in regressor.coef_)
        return LinearComponent(float(regressor.intercept_), coef)
