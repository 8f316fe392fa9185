"""SGDRegressorTrainer: a linear model whose weights Kepler evaluates itself."""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import SGDRegressor

from modelling.components import ComponentModel, LinearComponent
from modelling.trainers.base import Trainer


class SGDRegressorTrainer(Trainer):
    """Squared error with an L2 penalty, fitted by stochastic gradient descent.

    Watts are standardised before the fit and the coefficients mapped back afterwards:
    SGD's step sizes suit targets near unit scale, and a node's hundreds of watts would
    otherwise need thousands of epochs to move the intercept.
    """

    name = "SGDRegressorTrainer"
    model_class = "scikit"

    def __init__(self, max_iter: int = 2000, alpha: float = 1e-4, seed: int = 0) -> None:
        self.max_iter = max_iter
        self.alpha = alpha
        self.seed = seed

    def fit_component(
        self, x: np.ndarray, y: np.ndarray, features: tuple[str, ...], main_feature_index: int
    ) -> ComponentModel:
        centre, spread = float(np.mean(y)), float(np.std(y)) or 1.0
        regressor = SGDRegressor(
            loss="squared_error",
            penalty="l2",
            alpha=self.alpha,
            max_iter=self.max_iter,
            tol=1e-6,
            random_state=self.seed,
        )
        regressor.fit(x, (y - centre) / spread)
        coef = tuple(float(c) * spread for c in regressor.coef_)
        return LinearComponent(float(regressor.intercept_[0]) * spread + centre, coef)
