"""Isolation: node power on container rows turned into the dynamic power containers cause.

Every isolator first sums the containers of a node per timestamp, then decides how much of
the node's power is background. Dynamic power is never negative.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Protocol

import polars as pl

from modelling.extract import power_column
from modelling.vocabulary import ACCELERATOR_FEATURE, ISOLATOR_NAMES, SYSTEM_FEATURES

NODE_KEYS: tuple[str, ...] = ("instance", "timestamp")

# Node gauges repeat on every container row of a node: summing them would count them once per
# container.
_NODE_LEVEL_FEATURES = frozenset((*SYSTEM_FEATURES, ACCELERATOR_FEATURE))


class UnknownIsolatorError(ValueError):
    """An isolator name that is neither a known class name nor a metadata name."""


class IsolationInputError(ValueError):
    """A container frame that lacks the columns isolation needs."""


class Isolator(Protocol):
    name: str  # as written in pipeline metadata: "min", "none", ...

    def isolate(
        self, container: pl.DataFrame, features: Sequence[str], components: Sequence[str]
    ) -> pl.DataFrame:
        """Per (instance, timestamp): summed features and ``<component>_power`` dynamic watts."""
        ...


def sum_containers(
    container: pl.DataFrame, features: Sequence[str], components: Sequence[str]
) -> pl.DataFrame:
    """Workload features summed over containers per (instance, timestamp), with node power."""
    powers = [power_column(c) for c in components]
    absent = [c for c in (*NODE_KEYS, *features, *powers) if c not in container.columns]
    if absent:
        raise IsolationInputError(f"container frame lacks column(s) {', '.join(absent)}")

    per_feature = [
        pl.col(f).first() if f in _NODE_LEVEL_FEATURES else pl.col(f).sum() for f in features
    ]
    summed = container.group_by(NODE_KEYS).agg(*per_feature, *(pl.col(p).first() for p in powers))
    return summed.select(*NODE_KEYS, *features, *powers).sort(NODE_KEYS)


class NoneIsolator:
    """All of the node's power is dynamic: nothing is subtracted."""

    name = ISOLATOR_NAMES["NoneIsolator"]

    def isolate(
        self, container: pl.DataFrame, features: Sequence[str], components: Sequence[str]
    ) -> pl.DataFrame:
        summed = sum_containers(container, features, components)
        return summed.with_columns(pl.col(power_column(c)).clip(0.0) for c in components)


class MinIdleIsolator:
    """The lowest power a node drew in the window is its idle power, per component."""

    name = ISOLATOR_NAMES["MinIdleIsolator"]

    def isolate(
        self, container: pl.DataFrame, features: Sequence[str], components: Sequence[str]
    ) -> pl.DataFrame:
        summed = sum_containers(container, features, components)
        # An all-zero component stays zero: its minimum is zero and nothing is divided.
        return summed.with_columns(
            (pl.col(p) - pl.col(p).min().over("instance")).clip(0.0)
            for p in (power_column(c) for c in components)
        )


# ProfileBackgroundIsolator ("profile") and TrainIsolator ("trainer") register here once they
# exist; their names are already known, so asking for them says they are not available yet.
_ISOLATORS: Mapping[str, Callable[..., Isolator]] = MappingProxyType(
    {
        "MinIdleIsolator": MinIdleIsolator,
        "NoneIsolator": NoneIsolator,
    }
)


def make_isolator(name: str, **args: object) -> Isolator:
    """An isolator by class name ("MinIdleIsolator") or metadata name ("min")."""
    by_metadata = {short: full for full, short in ISOLATOR_NAMES.items()}
    class_name = name if name in ISOLATOR_NAMES else by_metadata.get(name)
    if class_name is None:
        known = ", ".join(f"{full} ({short})" for full, short in ISOLATOR_NAMES.items())
        raise UnknownIsolatorError(f"unknown isolator {name!r}; known: {known}")
    factory = _ISOLATORS.get(class_name)
    if factory is None:
        available = ", ".join(_ISOLATORS)
        raise UnknownIsolatorError(
            f"isolator {class_name} is not available yet; available: {available}"
        )
    return factory(**args)
