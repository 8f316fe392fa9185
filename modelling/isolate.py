"""Isolation: node power on container rows turned into the dynamic power containers cause.

Every isolator first sums the containers of a node per timestamp, then decides how much of
the node's power is background. Dynamic power is never negative.

The two isolators that know the background from an idle run (``profile`` and ``trainer``) take
its idle profile (``modelling.profile``). Its background containers are recognised by
namespace, pod and container name, so a container restarted under a new id is still background.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np
import polars as pl

from modelling.extract import power_column
from modelling.power_model import PowerModel
from modelling.profile import BACKGROUND_LABELS, IdleProfile, ProfileError, as_profile
from modelling.trainers import FitError, make_trainer
from modelling.training import TrainingSet, train_model
from modelling.vocabulary import (
    ACCELERATOR_FEATURE,
    FEATURE_GROUPS,
    ISOLATOR_NAMES,
    SYSTEM_FEATURES,
    OutputType,
)

logger = logging.getLogger(__name__)

NODE_KEYS: tuple[str, ...] = ("instance", "timestamp")

# Node gauges repeat on every container row of a node: summing them would count them once per
# container.
_NODE_LEVEL_FEATURES = frozenset((*SYSTEM_FEATURES, ACCELERATOR_FEATURE))


class UnknownIsolatorError(ValueError):
    """An isolator name that is neither a known class name nor a metadata name."""


class IsolatorArgumentError(ValueError):
    """Arguments an isolator does not take, or required ones missing."""


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


ProfileInput = IdleProfile | Mapping[str, Any] | str | Path
DEFAULT_BACKGROUND_TRAINERS: tuple[str, ...] = (
    "SGDRegressorTrainer",
    "GradientBoostingRegressorTrainer",
)


def background_rows(container: pl.DataFrame, background: Sequence[str]) -> pl.Series:
    """True on the rows of containers that ran in the idle run (``namespace/pod/container``)."""
    if all(label in container.columns for label in BACKGROUND_LABELS):
        key = pl.concat_str([pl.col(label) for label in BACKGROUND_LABELS], separator="/")
    elif "container_key" in container.columns:
        # container_key is namespace/pod/container/id; the id changes when a container restarts.
        key = pl.col("container_key").str.replace(r"/[^/]*$", "")
    else:
        raise IsolationInputError(
            "container frame lacks container_key and " + ", ".join(BACKGROUND_LABELS)
        )
    return container.select(key.is_in(list(background)).alias("background")).to_series()


def zero_workload(
    container: pl.DataFrame, rows: pl.Series, features: Sequence[str]
) -> pl.DataFrame:
    """The frame with the workload features of ``rows`` set to 0; node gauges are kept."""
    workload = [f for f in features if f not in _NODE_LEVEL_FEATURES]
    return container.with_columns(
        pl.when(rows).then(0.0).otherwise(pl.col(f)).alias(f) for f in workload
    )


class ProfileBackgroundIsolator:
    """Containers of the idle run are background; so is the idle profile's power.

    ``profile``: the idle profile (object, JSON body or path). The node type of a row is
    ``instance_node_types[instance]``, else ``node_type``, else the profile's only node type.
    """

    name = ISOLATOR_NAMES["ProfileBackgroundIsolator"]

    def __init__(
        self,
        *,
        profile: ProfileInput,
        node_type: int | None = None,
        instance_node_types: Mapping[str, int] | None = None,
        source: str = "rapl-sysfs",
    ) -> None:
        self.profile = as_profile(profile, source)
        self.node_type = node_type
        self.instance_node_types = dict(instance_node_types or {})

    def isolate(
        self, container: pl.DataFrame, features: Sequence[str], components: Sequence[str]
    ) -> pl.DataFrame:
        background = background_rows(container, self.profile.background_containers)
        summed = sum_containers(
            zero_workload(container, background, features), features, components
        )
        idle = self._idle_watts(summed["instance"].unique().to_list(), components)
        logger.info(
            "profile isolation: %d of %d container rows are background; idle watts %s",
            background.sum(),
            container.height,
            idle.to_dicts(),
        )
        return subtract_background(summed, idle, components)

    def _idle_watts(self, instances: list[str], components: Sequence[str]) -> pl.DataFrame:
        rows = []
        for instance in sorted(instances):
            node_type = node_type_of(
                instance, self.instance_node_types, self.node_type, self.profile
            )
            try:
                watts = {c: self.profile.background_watts(node_type, c) for c in components}
            except ProfileError as exc:
                raise IsolationInputError(str(exc)) from None
            rows.append({"instance": instance, **{_background(c): w for c, w in watts.items()}})
        schema = {"instance": pl.Utf8, **{_background(c): pl.Float64 for c in components}}
        return pl.DataFrame(rows, schema=schema)


def node_type_of(
    instance: str,
    instance_node_types: Mapping[str, int],
    node_type: int | None,
    profile: IdleProfile,
) -> int:
    if instance in instance_node_types:
        return instance_node_types[instance]
    if node_type is not None:
        return node_type
    if len(profile.node_types) == 1:
        return next(iter(profile.node_types))
    raise IsolationInputError(
        f"node type of {instance} unknown: give node_type or instance_node_types "
        f"(the idle profile has node types {sorted(profile.node_types)})"
    )


def _background(component: str) -> str:
    return f"{power_column(component)}_background"


def subtract_background(
    summed: pl.DataFrame, background: pl.DataFrame, components: Sequence[str]
) -> pl.DataFrame:
    """Node power minus the background columns (joined on the columns they share), at least 0."""
    keys = [c for c in background.columns if c in summed.columns]
    joined = summed.join(background, on=keys, how="left")
    below = joined.select(
        (pl.col(power_column(c)) < pl.col(_background(c)).fill_null(0.0)).sum().alias(c)
        for c in components
    ).row(0, named=True)
    for component, rows in below.items():
        if rows:
            logger.warning(
                "%d of %d rows draw less %s power than the background; their dynamic power "
                "is 0 W (is the idle run from the same kind of machine?)",
                rows,
                joined.height,
                component,
            )
    return joined.with_columns(
        (pl.col(power_column(c)) - pl.col(_background(c)).fill_null(0.0)).clip(0.0)
        for c in components
    ).select(summed.columns)


class TrainIsolator:
    """Background power predicted from the background containers' own usage.

    The model is the best AbsPower model (lowest ``error_key``) among ``abs_models`` that take
    these features and give these components; without one, each of ``trainers`` is fitted on
    the node sums of the frame being isolated, as an AbsPower model, and the best is used.
    Background containers are those of the idle ``profile``.
    """

    name = ISOLATOR_NAMES["TrainIsolator"]

    def __init__(
        self,
        *,
        profile: ProfileInput,
        abs_models: Sequence[PowerModel] = (),
        trainers: Sequence[str] = DEFAULT_BACKGROUND_TRAINERS,
        error_key: str = "mae",
        source: str = "rapl-sysfs",
    ) -> None:
        self.profile = as_profile(profile, source)
        self.abs_models = tuple(abs_models)
        self.trainers = tuple(trainers)
        self.error_key = error_key
        for trainer in self.trainers:
            make_trainer(trainer)  # an unknown name fails here, not in the middle of a flow

    def isolate(
        self, container: pl.DataFrame, features: Sequence[str], components: Sequence[str]
    ) -> pl.DataFrame:
        background = background_rows(container, self.profile.background_containers)
        model = self.background_model(container, features, components)
        usage = sum_containers(zero_workload(container, ~background, features), features, [])
        predicted = model.predict(usage.select(model.features).to_numpy().astype(float))
        watts = usage.select(*NODE_KEYS).with_columns(
            pl.Series(_background(c), np.asarray(predicted[c], dtype=float)) for c in components
        )
        summed = sum_containers(
            zero_workload(container, background, features), features, components
        )
        logger.info(
            "trainer isolation with %s: %d of %d container rows are background",
            model.name,
            background.sum(),
            container.height,
        )
        return subtract_background(summed, watts, components)

    def background_model(
        self, container: pl.DataFrame, features: Sequence[str], components: Sequence[str]
    ) -> PowerModel:
        """The best usable given AbsPower model, else the best one fitted here."""
        usable = [m for m in self.abs_models if _fits(m, features, components)]
        if not usable:
            usable = self._fit(
                sum_containers(container, features, components), features, components
            )
        return min(usable, key=lambda m: (_error(m, self.error_key), m.name))

    def _fit(
        self, node: pl.DataFrame, features: Sequence[str], components: Sequence[str]
    ) -> list[PowerModel]:
        ordered = node.sort("timestamp")
        data = TrainingSet(
            x=ordered.select(list(features)).to_numpy().astype(float),
            y={c: ordered[power_column(c)].to_numpy().astype(float) for c in components},
            features=tuple(features),
            feature_group=_group_of(features),
            output_type=OutputType.ABS_POWER.value,
            node_type=-1,
        )
        fitted, reasons = [], []
        for trainer in self.trainers:
            try:
                fitted.append(train_model(make_trainer(trainer), data))
            except FitError as exc:
                reasons.append(f"{trainer}: {exc}")
        if not fitted:
            raise IsolationInputError(
                "no AbsPower model for the background could be fitted: " + "; ".join(reasons)
            )
        return fitted


def _fits(model: PowerModel, features: Sequence[str], components: Sequence[str]) -> bool:
    return (
        model.metadata.get("output_type", OutputType.ABS_POWER.value) == OutputType.ABS_POWER
        and set(model.features) <= set(features)
        and set(components) <= set(model.components)
    )


def _error(model: PowerModel, key: str) -> float:
    value = model.metadata.get(key)
    return float(value) if isinstance(value, int | float) and value >= 0 else float("inf")


def _group_of(features: Sequence[str]) -> str:
    """The feature group with exactly these features; it decides a curve fit's main feature."""
    return next((g for g, fs in FEATURE_GROUPS.items() if set(fs) == set(features)), "")


_ISOLATORS: Mapping[str, Callable[..., Isolator]] = MappingProxyType(
    {
        "MinIdleIsolator": MinIdleIsolator,
        "NoneIsolator": NoneIsolator,
        "ProfileBackgroundIsolator": ProfileBackgroundIsolator,
        "TrainIsolator": TrainIsolator,
    }
)


def isolator_class_name(name: str) -> str:
    """The class name of an isolator given by class name or metadata name."""
    by_metadata = {short: full for full, short in ISOLATOR_NAMES.items()}
    class_name = name if name in ISOLATOR_NAMES else by_metadata.get(name)
    if class_name is None:
        known = ", ".join(f"{full} ({short})" for full, short in ISOLATOR_NAMES.items())
        raise UnknownIsolatorError(f"unknown isolator {name!r}; known: {known}")
    return class_name


def isolator_name(name: str) -> str:
    """The metadata name ("min", "profile", ...) of an isolator, without building it."""
    return ISOLATOR_NAMES[isolator_class_name(name)]


def needs_idle_profile(name: str) -> bool:
    """True for the isolators that take an idle run's profile (``profile`` and ``trainer``)."""
    return isolator_name(name) in (
        ISOLATOR_NAMES["ProfileBackgroundIsolator"],
        ISOLATOR_NAMES["TrainIsolator"],
    )


def make_isolator(name: str, **args: object) -> Isolator:
    """An isolator by class name ("MinIdleIsolator") or metadata name ("min")."""
    isolator = _ISOLATORS[isolator_class_name(name)]
    try:
        inspect.signature(isolator).bind(**args)
    except TypeError as exc:
        raise IsolatorArgumentError(f"isolator {name}: {exc}") from None
    return isolator(**args)
