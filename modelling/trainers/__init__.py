"""The trainer catalogue, by the names clients ask for.

Adding a trainer is one module beside this file and one line below.
"""

from __future__ import annotations

from modelling.trainers.base import FitError, Trainer
from modelling.trainers.gradient_boosting import GradientBoostingRegressorTrainer
from modelling.trainers.sgd import SGDRegressorTrainer

TRAINERS: dict[str, type[Trainer]] = {
    cls.name: cls
    for cls in (
        SGDRegressorTrainer,
        GradientBoostingRegressorTrainer,
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
