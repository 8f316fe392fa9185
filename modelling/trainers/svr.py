"""SVRRegressorTrainer: support vector regression with an RBF kernel."""

from __future__ import annotations

import numpy as np
from sklearn.compose import TransformedTargetRegressor
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVR

from modelling.components import ComponentModel, SkopsComponent
from modelling.trainers.base import Trainer


class SVRRegressorTrainer(Trainer):
    """RBF kernel, C and epsilon applied to standardised watts.

    With watts as they come, C = 1 bounds how far the model can move from its intercept to a
    few watts, and epsilon = 0.2 W is a different tolerance on a 20 W DRAM than on a 200 W
    package; on standardised watts both mean the same for every component.
    """

    name = "SVRRegressorTrainer"
    model_class = "scikit"

    def __init__(self, c: float = 1.0, epsilon: float = 0.2) -> None:
        self.c = c
        self.epsilon = epsilon

    def fit_component(
        self,
        x: np.ndarray,
        y: np.ndarray,
        features: tuple[str, ...],
        main_feature_index: int,
        *,
        through_origin: bool = False,
    ) -> ComponentModel:
        regressor = TransformedTargetRegressor(
            regressor=SVR(kernel="rbf", C=self.c, epsilon=self.epsilon),
            transformer=StandardScaler(),
        )
        return SkopsComponent(regressor.fit(x, y))
