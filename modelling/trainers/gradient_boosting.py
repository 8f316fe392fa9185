"""GradientBoostingRegressorTrainer: boosted trees, served as an archive only."""

from __future__ import annotations

import numpy as np
from sklearn.ensemble import GradientBoostingRegressor

from modelling.components import ComponentModel, SkopsComponent
from modelling.trainers.base import Trainer


class GradientBoostingRegressorTrainer(Trainer):
    name = "GradientBoostingRegressorTrainer"
    model_class = "scikit"

    def __init__(
        self, n_estimators: int = 100, max_depth: int = 3, learning_rate: float = 0.1
    ) -> None:
        self.n_estimators = n_estimators
        self.max_depth = max_depth
        self.learning_rate = learning_rate

    def fit_component(
        self, x: np.ndarray, y: np.ndarray, features: tuple[str, ...], main_feature_index: int
    ) -> ComponentModel:
        regressor = GradientBoostingRegressor(
            n_estimators=self.n_estimators,
            max_depth=self.max_depth,
            learning_rate=self.learning_rate,
            random_state=0,
        )
        return SkopsComponent(regressor.fit(x, y))
