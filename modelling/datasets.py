"""Turning extracted frames into the arrays a trainer fits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl

from modelling.training import TrainingSet


def power_column(component: str) -> str:
    return f"{component}_power"


def training_set(
    frame: pl.DataFrame,
    features: Sequence[str],
    components: Sequence[str],
    feature_group: str,
    output_type: str,
    node_type: int,
    machine_spec: dict[str, Any] | None = None,
) -> TrainingSet:
    """Rows in time order, features in model order, one power array per component."""
    ordered = frame.sort("timestamp")
    x = ordered.select(list(features)).to_numpy().astype(float)
    y = {c: ordered[power_column(c)].to_numpy().astype(float) for c in components}
    return TrainingSet(
        x=np.ascontiguousarray(x),
        y=y,
        features=tuple(features),
        feature_group=feature_group,
        output_type=output_type,
        node_type=node_type,
        machine_spec=machine_spec,
    )
