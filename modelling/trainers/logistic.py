"""LogisticRegressionTrainer: P = A / (1 + exp(-k * (x - x0))) + off on the main feature.

Despite the name (kept: clients ask for it), this is a logistic curve fitted by least
squares, not a classifier.
"""

from __future__ import annotations

import numpy as np

from modelling.trainers.curve_fit import Bounds, CurveFitTrainer, amplitude_and_offset

# Steepness in units of the data's range: 4 spans most of the S over the observed x, 12 a
# sharp step.
_STEEPNESS = (4.0, 12.0)


class LogisticRegressionTrainer(CurveFitTrainer):
    """Weights ``[A, x0, k, off]``; k > 0 with A of either sign covers rising and falling."""

    name = "LogisticRegressionTrainer"
    curve = "logistic"

    def starts(self, x: np.ndarray, y: np.ndarray) -> list[tuple[float, ...]]:
        midpoint, width = float(np.median(x)), float(np.ptp(x))
        starts: list[tuple[float, ...]] = []
        for steepness in _STEEPNESS:
            k = steepness / width
            sigmoid = 1.0 / (1.0 + np.exp(-k * (x - midpoint)))
            amplitude, offset = amplitude_and_offset(sigmoid, y)
            starts.append((amplitude, midpoint, k, offset))
        return starts

    def bounds(self) -> Bounds:
        return (-np.inf, -10.0, 1e-3, -np.inf), (np.inf, 10.0, 1e3, np.inf)
