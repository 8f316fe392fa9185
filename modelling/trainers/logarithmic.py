"""LogarithmicRegressionTrainer: P = a * ln(b * x + 1) + c on the main feature."""

from __future__ import annotations

import numpy as np

from modelling.trainers.curve_fit import Bounds, CurveFitTrainer, amplitude_and_offset

# b > 0 keeps ln's argument positive for every non-negative x.
_RATES = (1.0, 10.0, 0.1)


class LogarithmicRegressionTrainer(CurveFitTrainer):
    """Power that grows ever more slowly with activity; weights ``[a, b, c]``."""

    name = "LogarithmicRegressionTrainer"
    curve = "logarithmic"

    def starts(self, x: np.ndarray, y: np.ndarray) -> list[tuple[float, ...]]:
        starts: list[tuple[float, ...]] = []
        for rate in _RATES:
            amplitude, offset = amplitude_and_offset(np.log(rate * x + 1.0), y)
            starts.append((amplitude, rate, offset))
        return starts

    def bounds(self) -> Bounds:
        return (-np.inf, 1e-6, -np.inf), (np.inf, 1e6, np.inf)
