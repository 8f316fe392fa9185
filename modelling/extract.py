"""Kepler's raw Prometheus samples turned into per-node and per-container training rows.

Input is the long sample frame (``metric, labels, series_id, timestamp, value``) that
``storage`` reads from dumps and from its store. Output rows hold feature rates (per second)
and node power (watts) per component, with no missing values. Pure polars: no I/O here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import polars as pl

from modelling.vocabulary import (
    ACCELERATOR_FEATURE,
    FEATURE_GROUPS,
    PROMETHEUS_SOURCE_LABELS,
    SOURCE_COMPONENTS,
    WORKLOAD_FEATURES,
    components_of,
    group_features,
    normalise_source,
)

logger = logging.getLogger(__name__)

CONTAINER_LABELS: tuple[str, ...] = (
    "container_namespace",
    "pod_name",
    "container_name",
    "container_id",
)
NODE_KEYS: tuple[str, ...] = ("instance", "timestamp")
CONTAINER_KEYS: tuple[str, ...] = (
    "instance",
    "container_key",
    "container_id",
    "pod_name",
    "container_name",
    "container_namespace",
    "timestamp",
)

# Metric names older Kepler versions used for a feature. The 2023 exporter named its CPU-time
# counter ``_us`` although it counts milliseconds (its summed rate reaches 28 000/s on 32 CPUs),
# so the values are taken unchanged.
FEATURE_ALIASES: dict[str, tuple[str, ...]] = {
    "bpf_cpu_time_ms": ("kepler_container_bpf_cpu_time_us_total",),
}
FREQUENCY_METRIC = "kepler_node_cpu_scaling_frequency_hertz"
NODE_INFO_METRICS: tuple[str, ...] = ("kepler_node_info", "kepler_node_node_info")
ACCELERATOR_METRIC = "kepler_node_accelerator_intel_qat"
MIN_TIMESTAMPS = 2
_UNLABELLED = "(none)"


class GroupUnavailableError(ValueError):
    """A feature group that this extraction cannot provide, with the reason."""


def feature_metric(feature: str) -> str:
    return f"kepler_container_{feature}_total"


def energy_metric(component: str) -> str:
    return f"kepler_node_{component}_joules_total"


def power_column(component: str) -> str:
    return f"{component}_power"


@dataclass(frozen=True, eq=False)
class Extraction:
    """Training rows of one energy source, with what was available and what was not.

    ``node``: ``instance, timestamp``, the available features (sorted), ``<component>_power``.
    ``container``: ``instance``, ``container_key`` and its four labels, ``timestamp``, the
    features and the node's power at that timestamp. Neither holds a null, NaN or infinity.
    ``mappings``: every renaming applied (alias metric -> feature, ``source=<label>`` -> source).
    """

    node: pl.DataFrame
    container: pl.DataFrame
    features: tuple[str, ...]
    components: tuple[str, ...]
    source: str
    valid_groups: tuple[str, ...]
    skipped_groups: dict[str, str]
    mappings: dict[str, str]
    thirdparty: tuple[str, ...] = field(default=())

    @property
    def power_columns(self) -> tuple[str, ...]:
        return tuple(power_column(c) for c in self.components)

    def group_frame(self, group: str, level: Literal["node", "container"] = "node") -> pl.DataFrame:
        """Keys, the group's features in model order, then the power columns."""
        if group in self.skipped_groups:
            raise GroupUnavailableError(f"{group} is unavailable: {self.skipped_groups[group]}")
        if group not in self.valid_groups:
            raise GroupUnavailableError(f"unknown feature group {group!r}")
        if level == "node":
            frame, keys = self.node, NODE_KEYS
        elif level == "container":
            frame, keys = self.container, CONTAINER_KEYS
        else:
            raise ValueError(f"level is 'node' or 'container', not {level!r}")
        features = group_features(group, self.thirdparty)
        return frame.select(*keys, *features, *self.power_columns)


def extract(
    samples: pl.DataFrame,
    source: str = "rapl-sysfs",
    thirdparty: tuple[str, ...] = (),
) -> Extraction:
    """Feature rates and node power of ``source`` per node and per container."""
    source = normalise_source(source)
    labelled = _with_labels(samples, {"instance": "instance"})
    mappings: dict[str, str] = {}

    metric_features, missing = _choose_feature_metrics(
        set(labelled["metric"].unique()), tuple(thirdparty), mappings
    )
    rates = _container_rates(labelled, metric_features)
    missing.update(_unrated(metric_features, rates))
    power, components = _node_power(labelled, source, mappings)
    system, system_missing = _system_features(labelled)
    missing.update(system_missing)

    node, features = _node_rows(power, rates, system, components, missing)
    container = _container_rows(rates, node, features, components)
    valid, skipped = _judge_groups(features, node.height, missing, components, source, thirdparty)

    _log_summary(source, node, container, valid, skipped)
    return Extraction(
        node=node,
        container=container,
        features=features,
        components=components,
        source=source,
        valid_groups=valid,
        skipped_groups=skipped,
        mappings=mappings,
        thirdparty=tuple(thirdparty),
    )


def counter_rates(samples: pl.DataFrame) -> pl.DataFrame:
    """Add ``rate`` per second to each sample of each series (``series_id``).

    The first sample of a series has no rate (null), nor has a sample whose value fell (a
    counter reset: it starts afresh) or whose value or time step is not a finite increase.
    """
    delta = pl.col("value").diff().over("series_id")
    step = pl.col("timestamp").diff().over("series_id")
    usable = delta.is_finite() & (delta >= 0) & (step > 0)
    return samples.sort("series_id", "timestamp").with_columns(
        rate=pl.when(usable).then(delta / step).otherwise(None)
    )


def _with_labels(samples: pl.DataFrame, names: dict[str, str]) -> pl.DataFrame:
    """Add label values (label -> column name), parsed once per series rather than per sample.

    The columns are categorical, four bytes a sample; results leave this module as text.
    """
    per_series = samples.select("series_id", "labels").unique("series_id")
    # Kepler sometimes leaves a label out; an empty string keeps the keys free of nulls.
    parsed = per_series.select(
        "series_id",
        *(
            pl.col("labels")
            .cast(pl.Utf8)
            .str.json_path_match(f'$["{label}"]')
            .fill_null("")
            .cast(pl.Categorical)
            .alias(column)
            for label, column in names.items()
        ),
    )
    return samples.join(parsed, on="series_id", how="left")


def _choose_feature_metrics(
    present: set[str], thirdparty: tuple[str, ...], mappings: dict[str, str]
) -> tuple[dict[str, str], dict[str, str]]:
    """Metric -> feature for each feature found, and the reason for each one missing."""
    chosen: dict[str, str] = {}
    missing: dict[str, str] = {}
    for feature in dict.fromkeys((*WORKLOAD_FEATURES, *thirdparty)):
        candidates = _candidates(feature, thirdparty)
        metric = next((m for m in candidates if m in present), None)
        if metric is None:
            missing[feature] = f"no {' or '.join(candidates)} series"
            continue
        chosen[metric] = feature
        if metric not in (feature_metric(feature), feature):
            mappings[metric] = feature
            logger.info("feature %s read from %s, values unchanged", feature, metric)
    return chosen, missing


def _candidates(feature: str, thirdparty: tuple[str, ...]) -> tuple[str, ...]:
    """Metric names that may hold a feature, preferred first."""
    # A third-party metric may be named as Kepler names its own counters or by its own name.
    own_name = (feature,) if feature in thirdparty else ()
    return (feature_metric(feature), *FEATURE_ALIASES.get(feature, ()), *own_name)


def _container_rates(samples: pl.DataFrame, metric_features: dict[str, str]) -> pl.DataFrame:
    """Long frame of per-container rates; series of one container (per command) are summed."""
    selected = samples.filter(pl.col("metric").is_in(list(metric_features)))
    rated = counter_rates(selected).drop_nulls("rate")
    keyed = _with_labels(rated, {name: name for name in CONTAINER_LABELS}).with_columns(
        feature=pl.col("metric")
        .cast(pl.Utf8)
        .replace_strict(metric_features, return_dtype=pl.Categorical),
    )
    summed = keyed.group_by("instance", *CONTAINER_LABELS, "timestamp", "feature").agg(
        pl.col("rate").sum()
    )
    return summed.with_columns(pl.col("instance", *CONTAINER_LABELS, "feature").cast(pl.Utf8))


def _unrated(metric_features: dict[str, str], rates: pl.DataFrame) -> dict[str, str]:
    rated = set(rates["feature"].unique())
    return {
        feature: f"{metric} has no two consecutive increasing samples to take a rate from"
        for metric, feature in metric_features.items()
        if feature not in rated
    }


def _source_mapping(values: Iterable[str], source: str) -> dict[str, str | None]:
    """Kepler's ``source`` label value -> our source name; None for a value we do not know."""
    mapping: dict[str, str | None] = {}
    for value in values:
        if value == "":
            # Without a label nothing contradicts the request; the component names the meter.
            mapping[value] = source
        elif value in PROMETHEUS_SOURCE_LABELS:
            mapping[value] = PROMETHEUS_SOURCE_LABELS[value]
        else:
            mapping[value] = "rapl-sysfs" if "rapl" in value else None
    return mapping


def _node_power(
    samples: pl.DataFrame, source: str, mappings: dict[str, str]
) -> tuple[pl.DataFrame, tuple[str, ...]]:
    """Watts per component of ``source`` per (instance, timestamp), only where complete."""
    known = {c for comps in SOURCE_COMPONENTS.values() for c in comps}
    energy = samples.filter(pl.col("metric").is_in([energy_metric(c) for c in known]))
    energy = _with_labels(energy, {"source": "source_label"})
    by_label = _source_mapping(sorted(energy["source_label"].unique()), source)
    _record_sources(by_label, mappings)

    wanted = [label for label, mapped in by_label.items() if mapped == source]
    energy = energy.filter(pl.col("source_label").is_in(wanted))
    power: pl.DataFrame | None = None
    components: list[str] = []
    for component in components_of(source):
        watts = _component_watts(energy.filter(pl.col("metric") == energy_metric(component)))
        if watts.height == 0:
            logger.warning("no %s energy series for source %s", component, source)
            continue
        components.append(component)
        watts = watts.rename({"watts": power_column(component)})
        power = watts if power is None else power.join(watts, on=NODE_KEYS, how="inner")
    if power is None:
        return pl.DataFrame(schema={"instance": pl.Utf8, "timestamp": pl.Float64}), ()
    return power, tuple(components)


def _record_sources(by_label: dict[str, str | None], mappings: dict[str, str]) -> None:
    for label, mapped in by_label.items():
        shown = label or _UNLABELLED
        if mapped is None:
            logger.warning("energy source label %r is not a known source; ignored", shown)
            continue
        mappings[f"source={shown}"] = mapped
        logger.info("energy source label %r read as source %s", shown, mapped)


def _component_watts(energy: pl.DataFrame) -> pl.DataFrame:
    """Sum over mode and package of each series' power; a timestamp where any series present
    has no rate (first sample, reset) is left out rather than under-counted."""
    rated = counter_rates(energy)
    summed = rated.group_by(NODE_KEYS).agg(
        watts=pl.col("rate").sum(), complete=pl.col("rate").is_not_null().all()
    )
    complete = summed.filter(pl.col("complete")).drop("complete")
    return complete.with_columns(pl.col("instance").cast(pl.Utf8))


def _system_features(samples: pl.DataFrame) -> tuple[list[pl.DataFrame], dict[str, str]]:
    """Node gauges keyed by (instance, timestamp), and reasons for those missing."""
    parts: list[pl.DataFrame] = []
    missing: dict[str, str] = {}
    gauges = [
        ("cpu_scaling_frequency_hertz", [FREQUENCY_METRIC], pl.col("value").mean()),
        ("node_info", list(NODE_INFO_METRICS), pl.lit(1.0)),
        (ACCELERATOR_FEATURE, [ACCELERATOR_METRIC], pl.col("value").sum()),
    ]
    for feature, metrics, aggregate in gauges:
        rows = samples.filter(pl.col("metric").is_in(metrics) & pl.col("value").is_finite())
        if rows.height == 0:
            missing[feature] = f"no {' or '.join(metrics)} series"
            continue
        part = rows.group_by(NODE_KEYS).agg(aggregate.alias(feature))
        parts.append(part.with_columns(pl.col("instance").cast(pl.Utf8)))
    return parts, missing


def _node_rows(
    power: pl.DataFrame,
    rates: pl.DataFrame,
    system: list[pl.DataFrame],
    components: tuple[str, ...],
    missing: dict[str, str],
) -> tuple[pl.DataFrame, tuple[str, ...]]:
    """Power joined with summed container rates and system gauges; no nulls, no all-zero power."""
    summed = rates.group_by(*NODE_KEYS, "feature").agg(pl.col("rate").sum())
    node = power.join(_pivot(summed, NODE_KEYS), on=NODE_KEYS, how="left")
    for part in system:
        node = node.join(part, on=NODE_KEYS, how="left")

    candidates = [c for c in node.columns if c not in power.columns]
    features = tuple(sorted(_available(node, candidates, missing)))
    node = node.select(*NODE_KEYS, *features, *(power_column(c) for c in components))
    return _complete_rows(node, features, components, "node").sort(NODE_KEYS), features


def _pivot(rates: pl.DataFrame, keys: Sequence[str]) -> pl.DataFrame:
    """One column per feature from rows unique per (keys, feature); absent values stay null."""
    features = sorted(rates["feature"].unique())
    if not features:
        return rates.select(keys).unique()
    return rates.group_by(keys).agg(
        pl.col("rate").filter(pl.col("feature") == f).first().alias(f) for f in features
    )


def _available(node: pl.DataFrame, candidates: list[str], missing: dict[str, str]) -> list[str]:
    available = [f for f in candidates if node[f].is_not_null().any()]
    for feature in set(candidates) - set(available):
        missing[feature] = "no value at any timestamp with power readings"
    return available


def _complete_rows(
    frame: pl.DataFrame, features: Sequence[str], components: Sequence[str], level: str
) -> pl.DataFrame:
    """Rows with every value present and finite, and some power in at least one component."""
    values = [*features, *(power_column(c) for c in components)]
    powers = [pl.col(power_column(c)) != 0 for c in components]
    complete = frame.drop_nulls(values)
    if values:
        complete = complete.filter(pl.all_horizontal(pl.col(values).is_finite()))
    informative = complete.filter(pl.any_horizontal(powers)) if powers else complete
    logger.info(
        "%s rows: %d kept, %d with a missing value, %d with zero power in every component",
        level,
        informative.height,
        frame.height - complete.height,
        complete.height - informative.height,
    )
    return informative


def _container_rows(
    rates: pl.DataFrame,
    node: pl.DataFrame,
    features: tuple[str, ...],
    components: tuple[str, ...],
) -> pl.DataFrame:
    """Per-container rates on the node's kept timestamps, with the node's power and gauges."""
    keys = ["instance", *CONTAINER_LABELS, "timestamp"]
    workload = _pivot(rates, keys)
    shared = [c for c in node.columns if c not in workload.columns or c in NODE_KEYS]
    rows = workload.join(node.select(shared), on=NODE_KEYS, how="inner")
    rows = rows.with_columns(
        container_key=pl.concat_str([pl.col(c) for c in CONTAINER_LABELS], separator="/")
    )
    rows = rows.select(*CONTAINER_KEYS, *features, *(power_column(c) for c in components))
    return _complete_rows(rows, features, components, "container").sort(
        "instance", "container_key", "timestamp"
    )


def _judge_groups(
    features: tuple[str, ...],
    usable_rows: int,
    missing: dict[str, str],
    components: tuple[str, ...],
    source: str,
    thirdparty: tuple[str, ...],
) -> tuple[tuple[str, ...], dict[str, str]]:
    """Groups in the table's order that have every feature, power and two usable timestamps."""
    groups = [*FEATURE_GROUPS, "ThirdParty"] if thirdparty else list(FEATURE_GROUPS)
    skipped: dict[str, str] = {}
    for group in groups:
        absent = [f for f in group_features(group, thirdparty) if f not in features]
        if absent:
            skipped[group] = "; ".join(f"missing {f} ({missing.get(f, 'no data')})" for f in absent)
        elif not components:
            skipped[group] = f"no energy series for source {source}"
        elif usable_rows < MIN_TIMESTAMPS:
            skipped[group] = f"{usable_rows} usable timestamp(s); at least {MIN_TIMESTAMPS} needed"
    valid = tuple(g for g in groups if g not in skipped)
    return valid, skipped


def _log_summary(
    source: str,
    node: pl.DataFrame,
    container: pl.DataFrame,
    valid: tuple[str, ...],
    skipped: dict[str, str],
) -> None:
    logger.info(
        "extracted %s: %d node rows, %d container rows, valid groups %s",
        source,
        node.height,
        container.height,
        ", ".join(valid) or "none",
    )
    for group, reason in skipped.items():
        logger.info("feature group %s skipped: %s", group, reason)
