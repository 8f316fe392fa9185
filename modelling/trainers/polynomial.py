"""PolynomialRegressionTrainer: least squares on all products of up to two features."""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LinearRegression
from sklearn.preprocessing import PolynomialFeatures

from modelling.components import ComponentModel, PolynomialComponent
from modelling.trainers.base import Trainer


class PolynomialRegressionTrainer(Trainer):
    """Degree-2 polynomial features (x_i, x_i * x_j, x_i ** 2), then ordinary least squares.

    The fitted polynomial is stored as JSON (each term's powers and coefficient).
    """

    name = "PolynomialRegressionTrainer"
    model_class = "scikit"

    def __init__(self, degree: int = 2) -> None:
        self.degree = degree

    def fit_component(
        self,
        x: np.ndarray,
        y: np.ndarray,
        features: tuple[str, ...],
        main_feature_index: int,
        *,
        through_origin: bool = False,
    ) -> ComponentModel:
        expand = PolynomialFeatures(degree=self.degree, include_bias=False)
        terms = expand.fit_transform(x)
        regressor = LinearRegression().fit(terms, y)
        powers = tuple(tuple(int(p) for p in row) for row in expand.powers_)
        coef = tuple(float(c) for c in regressor.coef_)
        return PolynomialComponent(powers, float(regressor.intercept_), coef)
