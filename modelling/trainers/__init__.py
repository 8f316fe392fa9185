"""The trainer catalogue, by the names clients ask for.

Adding a trainer is one module beside this file and one line below.
"""

from __future__ import annotations

from modelling.trainers.base import FitError, Trainer
from modelling.trainers.exponential import ExponentialRegressionTrainer
from modelling.trainers.gradient_boosting import GradientBoostingRegressorTrainer
from modelling.trainers.k_neighbors import KNeighborsRegressorTrainer
from modelling.trainers.linear_regression import LinearRegressionTrainer
from modelling.trainers.logarithmic import LogarithmicRegressionTrainer
from modelling.trainers.logistic import LogisticRegressionTrainer
from modelling.trainers.polynomial import PolynomialRegressionTrainer
from modelling.trainers.sgd import SGDRegressorTrainer
from modelling.trainers.svr import SVRRegressorTrainer
from modelling.trainers.xgboost_fit import XgboostFitTrainer

# In the order of SPEC section 1 (and vocabulary.TRAINER_NAMES).
TRAINERS: dict[str, type[Trainer]] = {
    cls.name: cls
    for cls in (
        SGDRegressorTrainer,
        LinearRegressionTrainer,
        PolynomialRegressionTrainer,
        GradientBoostingRegressorTrainer,
        KNeighborsRegressorTrainer,
        SVRRegressorTrainer,
        XgboostFitTrainer,
        LogarithmicRegressionTrainer,
        ExponentialRegressionTrainer,
        LogisticRegressionTrainer,
    )
}


class UnknownTrainerError(ValueError):
    """A trainer name that the catalogue does not hold."""


def make_trainer(name: str) -> Trainer:
    try:
        return TRAINERS[name]()
    except KeyError:
        raise UnknownTrainerError(
            f"unknown trainer {name!r}; available: {', '.join(TRAINERS)}"
        ) from None


__all__ = ["TRAINERS", "FitError", "Trainer", "UnknownTrainerError", "make_trainer"]
