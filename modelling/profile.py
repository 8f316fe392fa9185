"""Idle profiles: what each node type draws when nothing but the background runs (SPEC section 3).

From the samples of an idle run: per energy source, node type and component, the idle power
(min, max and mean watts over the run, and the number of units measured: packages for RAPL,
one for platform meters), and the containers that were running (the background). Written as
``profile/<source>.json``; ``ProfileBackgroundIsolator`` and ``TrainIsolator`` read it.

The mean is the counters' energy over the run's time (not a mean of per-step rates, which gives
short steps the weight of long ones). A repeated counter reading is a scrape that brought
nothing new, not zero watts: it is merged into the next step that advances, and dropped at the
end of the run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from modelling.extract import energy_metric
from modelling.vocabulary import (
    PLATFORM_COMPONENTS,
    PROMETHEUS_SOURCE_LABELS,
    SOURCE_COMPONENTS,
)

logger = logging.getLogger(__name__)

PROFILE_DIR = "profile"
CONTAINER_PREFIX = "kepler_container_"
BACKGROUND_LABELS: tuple[str, ...] = ("container_namespace", "pod_name", "container_name")
_COMPONENTS = tuple(dict.fromkeys(c for comps in SOURCE_COMPONENTS.values() for c in comps))


class ProfileError(ValueError):
    """An idle run without energy readings, or a profile that lacks what is asked of it."""


@dataclass(frozen=True)
class IdlePower:
    """Idle power of one component of one node type."""

    min_watts: float
    max_watts: float
    mean_watts: float
    units: int
    intervals: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "min_watts": round(self.min_watts, 4),
            "max_watts": round(self.max_watts, 4),
            "mean_watts": round(self.mean_watts, 4),
            "units": self.units,
            "intervals": self.intervals,
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class IdleProfile:
    """The idle profile of one energy source."""

    source: str
    node_types: Mapping[int, Mapping[str, IdlePower]]
    background_containers: tuple[str, ...] = ()
    instances: Mapping[str, int] = field(default_factory=dict)
    start: float = 0.0
    end: float = 0.0

    def background_watts(self, node_type: int, component: str) -> float:
        """Mean idle watts of a component of a node type; raises when the run did not see it."""
        components = self.node_types.get(node_type)
        if components is None:
            known = ", ".join(str(n) for n in sorted(self.node_types)) or "none"
            raise ProfileError(
                f"the {self.source} idle profile has no node type {node_type} (it has {known})"
            )
        if component not in components:
            raise ProfileError(
                f"the {self.source} idle profile of node type {node_type} has no {component} "
                f"(it has {', '.join(components) or 'none'})"
            )
        return components[component].mean_watts

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "window": {"start": self.start, "end": self.end},
            "instances": dict(self.instances),
            "node_types": {
                str(nt): {c: power.to_json() for c, power in comps.items()}
                for nt, comps in sorted(self.node_types.items())
            },
            "background_containers": list(self.background_containers),
        }

    @classmethod
    def from_json(cls, body: Any) -> IdleProfile:
        try:
            node_types = {
                int(nt): {c: IdlePower(**power) for c, power in comps.items()}
                for nt, comps in body["node_types"].items()
            }
            window = body.get("window") or {}
            return cls(
                source=str(body["source"]),
                node_types=node_types,
                background_containers=tuple(str(c) for c in body.get("background_containers", ())),
                instances={str(i): int(nt) for i, nt in (body.get("instances") or {}).items()},
                start=float(window.get("start", 0.0)),
                end=float(window.get("end", 0.0)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ProfileError(f"not an idle profile: {exc!r}") from None


@dataclass(frozen=True)
class _Reading:
    """The summed energy steps of one (source, instance, component)."""

    source: str
    instance: str
    component: str
    units: int
    steps: pl.DataFrame  # timestamp, seconds, joules, complete


def build_profiles(
    samples: pl.DataFrame,
    node_type: int = 0,
    instance_node_types: Mapping[str, int] | None = None,
) -> dict[str, IdleProfile]:
    """One idle profile per energy source found in the samples of an idle run.

    Every instance is of ``node_type`` unless ``instance_node_types`` says otherwise.
    """
    # An idle run is short: its names and labels are worked on as text.
    samples = samples.with_columns(pl.col("metric", "labels").cast(pl.Utf8))
    readings = _readings(samples)
    if not readings:
        raise ProfileError("the idle run holds no node energy series of a known source")
    types = {r.instance: (instance_node_types or {}).get(r.instance, node_type) for r in readings}
    background = background_containers(samples)
    window = samples.filter(pl.col("metric").is_in([energy_metric(c) for c in _COMPONENTS]))
    start, end = float(window["timestamp"].min()), float(window["timestamp"].max())  # type: ignore[arg-type]

    profiles = {}
    for source in sorted({r.source for r in readings}):
        mine = [r for r in readings if r.source == source]
        profiles[source] = IdleProfile(
            source=source,
            node_types=_per_node_type(mine, types),
            background_containers=background,
            instances={r.instance: types[r.instance] for r in mine},
            start=start,
            end=end,
        )
        _log_profile(profiles[source])
    return profiles


def background_containers(samples: pl.DataFrame) -> tuple[str, ...]:
    """``namespace/pod/container`` of every container with a series in the run."""
    labels = samples.filter(pl.col("metric").str.starts_with(CONTAINER_PREFIX))
    keys = labels.select(pl.col("labels").unique()).with_columns(
        pl.concat_str(
            [
                pl.col("labels").str.json_path_match(f"$.{name}").fill_null("")
                for name in BACKGROUND_LABELS
            ],
            separator="/",
        ).alias("key")
    )
    return tuple(sorted(set(keys["key"].to_list())))


def _readings(samples: pl.DataFrame) -> list[_Reading]:
    energy = samples.filter(pl.col("metric").is_in([energy_metric(c) for c in _COMPONENTS]))
    labelled = energy.with_columns(
        pl.col("metric").str.extract(r"^kepler_node_(\w+)_joules_total$").alias("component"),
        *(
            pl.col("labels").str.json_path_match(f"$.{name}").fill_null("").alias(name)
            for name in ("source", "instance", "package")
        ),
    )
    readings = []
    groups = labelled.partition_by("source", "instance", "component", as_dict=True)
    for (label, instance, component), frame in sorted(groups.items()):
        source = _source_of(str(label), str(component))
        if source is None:
            continue
        units = max(1, frame["package"].n_unique())
        readings.append(_Reading(source, str(instance), str(component), units, _steps(frame)))
    return readings


def _source_of(label: str, component: str) -> str | None:
    """Kepler's ``source`` label of a node energy series -> our source; None: not ours."""
    if label == "":
        source = "acpi" if component in PLATFORM_COMPONENTS else "rapl-sysfs"
    else:
        source = PROMETHEUS_SOURCE_LABELS.get(label) or ("rapl-sysfs" if "rapl" in label else "")
    if not source or component not in SOURCE_COMPONENTS[source]:
        logger.info("idle run: %s energy with source %r is not profiled", component, label)
        return None
    return source


def _steps(frame: pl.DataFrame) -> pl.DataFrame:
    """Per timestamp: seconds since the previous one and joules summed over every series (mode,
    package); ``complete`` is false where a series is missing, restarted or went backwards."""
    series = frame["series_id"].n_unique()
    per_series = frame.sort("series_id", "timestamp").with_columns(
        joules=pl.col("value").diff().over("series_id"),
        seconds=pl.col("timestamp").diff().over("series_id"),
    )
    valid = pl.col("joules").is_finite() & (pl.col("joules") >= 0) & (pl.col("seconds") > 0)
    steps = per_series.group_by("timestamp").agg(
        pl.col("joules").sum(),
        pl.col("seconds").max(),
        complete=(valid.fill_null(False).all() & (pl.len() == series)),
        aligned=pl.col("seconds").n_unique() == 1,
    )
    steps = steps.with_columns(complete=pl.col("complete") & pl.col("aligned")).drop("aligned")
    return steps.sort("timestamp")


def merged_steps(steps: pl.DataFrame) -> list[tuple[float, float]]:
    """(seconds, joules) of each step whose counters advanced, with the time of the repeated
    readings before it; a step that is not complete breaks the chain, trailing repeats drop."""
    merged: list[tuple[float, float]] = []
    waiting = 0.0
    for seconds, joules, complete in steps.select("seconds", "joules", "complete").iter_rows():
        if not complete:
            waiting = 0.0
        elif joules > 0:
            merged.append((seconds + waiting, joules))
            waiting = 0.0
        else:
            waiting += seconds
    return merged


def _per_node_type(
    readings: list[_Reading], types: Mapping[str, int]
) -> dict[int, dict[str, IdlePower]]:
    grouped: dict[int, dict[str, list[_Reading]]] = {}
    for reading in readings:
        by_component = grouped.setdefault(types[reading.instance], {})
        by_component.setdefault(reading.component, []).append(reading)
    return {
        node_type: {c: idle_power(rs) for c, rs in sorted(comps.items())}
        for node_type, comps in sorted(grouped.items())
    }


def idle_power(readings: Iterable[_Reading]) -> IdlePower:
    """Pool the steps of every instance; a counter that never advanced is a constant 0 W."""
    readings = list(readings)
    steps = [step for r in readings for step in merged_steps(r.steps)]
    units = max(r.units for r in readings)
    if not steps:
        seconds = sum(float(r.steps.filter(pl.col("complete"))["seconds"].sum()) for r in readings)
        return IdlePower(0.0, 0.0, 0.0, units, 0, seconds)
    watts = [joules / seconds for seconds, joules in steps]
    total_seconds = sum(seconds for seconds, _ in steps)
    total_joules = sum(joules for _, joules in steps)
    return IdlePower(
        min(watts), max(watts), total_joules / total_seconds, units, len(steps), total_seconds
    )


def _log_profile(profile: IdleProfile) -> None:
    for node_type, components in profile.node_types.items():
        logger.info(
            "idle profile %s node type %d: %s; %d background containers",
            profile.source,
            node_type,
            ", ".join(
                f"{c} {p.mean_watts:.2f} W (min {p.min_watts:.2f}, max {p.max_watts:.2f}, "
                f"{p.units} units)"
                for c, p in components.items()
            ),
            len(profile.background_containers),
        )


def profile_path(folder: Path, source: str) -> Path:
    return folder / PROFILE_DIR / f"{source}.json"


def write_profiles(profiles: Mapping[str, IdleProfile], folder: Path) -> list[Path]:
    """Write ``<folder>/profile/<source>.json`` for each profile; the files written."""
    written = []
    for source, profile in sorted(profiles.items()):
        path = profile_path(folder, source)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(profile.to_json(), indent=1) + "\n")
        written.append(path)
    return written


def read_profile(path: Path, source: str = "rapl-sysfs") -> IdleProfile:
    """A profile file, or the ``source`` profile in a folder holding ``profile/<source>.json``
    (or ``<source>.json`` directly)."""
    file = path
    if path.is_dir():
        nested = profile_path(path, source)
        file = nested if nested.is_file() else path / f"{source}.json"
    try:
        body = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ProfileError(f"cannot read the idle profile {file}: {exc}") from exc
    return IdleProfile.from_json(body)


def as_profile(value: IdleProfile | Mapping[str, Any] | str | Path, source: str) -> IdleProfile:
    """An idle profile given as itself, as its JSON body, or as a path (file or folder)."""
    if isinstance(value, IdleProfile):
        return value
    if isinstance(value, Mapping):
        return IdleProfile.from_json(value)
    return read_profile(Path(value), source)
