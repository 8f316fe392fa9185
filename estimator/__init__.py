"""The Unix socket estimator Kepler asks for power predictions (SPEC section 7)."""

from estimator.server import EstimatorServer, run_estimator

__all__ = ["EstimatorServer", "run_estimator"]
