"""SGDRegressorTrainer: a linear model whose weights Kepler evaluates itself."""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import SGDRegressor

from modelling.components import ComponentModel, LinearComponent
from modelling.trainers.base import Trainer


class SGDRegressorTrainer(Trainer):
    """Squared error with an L2 penalty, fitted by stochastic gradient descent.

    Watts are brought to unit scale before the fit and the coefficients mapped back: SGD's
    step sizes suit such targets, and a node's hundreds of watts would otherwise need
    thousands of epochs to move the intercept. The adaptive learning rate keeps stepping
    while the loss improves, which near-collinear counters (cycles and instructions) need.
    """

    name = "SGDRegressorTrainer"
    model_class = "scikit"
    honours_through_origin = True

    def __init__(
        self,
        max_iter: int = 10_000,
        alpha: float = 1e-4,
        eta0: float = 0.1,
        tol: float = 1e-6,
        seed: int = 0,
    ) -> None:
        self.max_iter = max_iter
        self.alpha = alpha
        self.eta0 = eta0
        self.tol = tol
        self.seed = seed

    def fit_component(
        self,
        x: np.ndarray,
        y: np.ndarray,
        features: tuple[str, ...],
        main_feature_index: int,
        *,
        through_origin: bool = False,
    ) -> ComponentModel:
        centre = 0.0 if through_origin else float(np.mean(y))
        spread = float(np.sqrt(np.mean((y - centre) ** 2))) or 1.0
        regressor = SGDRegressor(
            loss="squared_error",
            penalty="l2",
            alpha=self.alpha,
            fit_intercept=not through_origin,
            learning_rate="adaptive",
            eta0=self.eta0,
            max_iter=self.max_iter,
            tol=self.tol,
            random_state=self.seed,
        )
        regressor.fit(x, (y - centre) / spread)
        coef = tuple(float(c) * spread for c in regressor.coef_)
        intercept = float(regressor.intercept_[0]) * spread + centre
        return LinearComponent(0.0 if through_origin else intercept, coef)
