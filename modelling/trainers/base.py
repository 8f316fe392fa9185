"""The interface every trainer implements: fit one component on scaled features."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from modelling.components import ComponentModel


class FitError(RuntimeError):
    """A component fit that failed or did not converge; the model is not published."""


class Trainer(ABC):
    """A trainer fits one component model from scaled rows ``x`` to watts ``y``.

    ``main_feature_index`` is the column of the group's main feature for this component;
    only one-feature curve fits use it.
    """

    name: ClassVar[str]
    model_class: ClassVar[str]
    curve: ClassVar[str | None] = None

    @abstractmethod
    def fit_component(
        self, x: np.ndarray, y: np.ndarray, features: tuple[str, ...], main_feature_index: int
    ) -> ComponentModel: ...
