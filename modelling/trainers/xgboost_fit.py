"""XgboostFitTrainer: gradient-boosted trees by XGBoost, stored in XGBoost's JSON format."""

from __future__ import annotations

import numpy as np

from modelling.components import ComponentModel, XgboostComponent
from modelling.trainers.base import Trainer

EXACT_MAX_ROWS = 10_000


class XgboostFitTrainer(Trainer):
    """Squared error, ``n_estimators`` trees of depth at most ``max_depth``.

    One thread per fit: the flow already runs fits side by side, and XGBoost's own threads
    would compete with them for the same cores. ``tree_method="auto"`` searches every split
    exactly up to ``EXACT_MAX_ROWS`` rows (three times faster than histograms there, and as
    accurate as a split search gets) and uses histograms beyond.
    """

    name = "XgboostFitTrainer"
    model_class = "xgboost"
    relative_cost = 5

    def __init__(
        self,
        n_estimators: int = 100,
        learning_rate: float = 0.1,
        max_depth: int = 6,
        tree_method: str = "auto",
    ) -> None:
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.max_depth = max_depth
        self.tree_method = tree_method

    def fit_component(
        self,
        x: np.ndarray,
        y: np.ndarray,
        features: tuple[str, ...],
        main_feature_index: int,
        *,
        through_origin: bool = False,
    ) -> ComponentModel:
        import xgboost

        method = self.tree_method
        if method == "auto":
            method = "exact" if len(y) <= EXACT_MAX_ROWS else "hist"
        regressor = xgboost.XGBRegressor(
            n_estimators=self.n_estimators,
            learning_rate=self.learning_rate,
            max_depth=self.max_depth,
            objective="reg:squarederror",
            tree_method=method,
            n_jobs=1,
            random_state=0,
        )
        regressor.fit(x, y)
        return XgboostComponent(regressor.get_booster())
