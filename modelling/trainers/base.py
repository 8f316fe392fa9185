"""The interface every trainer implements: fit one component on scaled features."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from modelling.components import ComponentModel


class FitError(RuntimeError):
    """A component fit that failed or did not converge; the model is not published."""


class Trainer(ABC):
    """A trainer fits one component model from scaled rows ``x`` to watts ``y``.

    ``main_feature_index`` is the column of the group's main feature for this component;
    only one-feature curve fits use it. ``through_origin`` asks for a model that gives 0 W
    when every feature is 0: a dynamic-power model is applied to each container, so a
    constant term would be charged once per container. Trainers whose model family can
    honour it say so with ``honours_through_origin``; the others ignore it.
    """

    name: ClassVar[str]
    model_class: ClassVar[str]
    curve: ClassVar[str | None] = None
    honours_through_origin: ClassVar[bool] = False
    # Rough fit time against a linear fit's; the fan-out starts the costliest fits first so
    # that no long fit is left running alone at the end.
    relative_cost: ClassVar[int] = 1

    @abstractmethod
    def fit_component(
        self,
        x: np.ndarray,
        y: np.ndarray,
        features: tuple[str, ...],
        main_feature_index: int,
        *,
        through_origin: bool = False,
    ) -> ComponentModel: ...

    def hyperparameters(self) -> dict[str, Any]:
        """The constructor's arguments, as recorded in each model's metadata."""
        return dict(vars(self))
