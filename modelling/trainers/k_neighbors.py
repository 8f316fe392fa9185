"""KNeighborsRegressorTrainer: the mean power of the nearest training rows."""

from __future__ import annotations

import numpy as np
from sklearn.neighbors import KNeighborsRegressor

from modelling.components import ComponentModel, SkopsComponent
from modelling.trainers.base import Trainer


class KNeighborsRegressorTrainer(Trainer):
    """k nearest neighbours by Euclidean distance on scaled features, uniform weights."""

    name = "KNeighborsRegressorTrainer"
    model_class = "scikit"

    def __init__(self, n_neighbors: int = 6) -> None:
        self.n_neighbors = n_neighbors

    def fit_component(
        self,
        x: np.ndarray,
        y: np.ndarray,
        features: tuple[str, ...],
        main_feature_index: int,
        *,
        through_origin: bool = False,
    ) -> ComponentModel:
        # Fewer training rows than k would make predict fail; use all of them instead.
        regressor = KNeighborsRegressor(n_neighbors=min(self.n_neighbors, len(y)))
        return SkopsComponent(regressor.fit(x, y))
