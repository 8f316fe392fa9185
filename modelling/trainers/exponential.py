"""ExponentialRegressionTrainer: P = a * exp(b * x) + c on the main feature."""

from __future__ import annotations

import numpy as np

from modelling.trainers.curve_fit import Bounds, CurveFitTrainer, amplitude_and_offset

# A negative rate with a negative amplitude is a curve that rises and levels off, which is
# what package power usually does; a positive rate is one that rises ever faster.
_RATES = (1.0, -1.0, 3.0, -3.0)


class ExponentialRegressionTrainer(CurveFitTrainer):
    """Weights ``[a, b, c]``; |b| is bounded by 10 so that exp stays finite near x = 1."""

    name = "ExponentialRegressionTrainer"
    curve = "exponential"

    def starts(self, x: np.ndarray, y: np.ndarray) -> list[tuple[float, ...]]:
        starts: list[tuple[float, ...]] = []
        for rate in _RATES:
            amplitude, offset = amplitude_and_offset(np.exp(rate * x), y)
            starts.append((amplitude, rate, offset))
        return starts

    def bounds(self) -> Bounds:
        return (-np.inf, -10.0, -np.inf), (np.inf, 10.0, np.inf)
