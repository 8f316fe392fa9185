"""The words Kepler and its model database share: sources, components, groups, trainers.

Every package imports these names from here, so that a feature group or a trainer name is
spelled once.
"""

from __future__ import annotations

from enum import StrEnum


class OutputType(StrEnum):
    ABS_POWER = "AbsPower"
    DYN_POWER = "DynPower"


DEFAULT_SOURCE = "rapl-sysfs"

RAPL_COMPONENTS: tuple[str, ...] = ("package", "core", "uncore", "dram")
PLATFORM_COMPONENTS: tuple[str, ...] = ("platform",)

SOURCE_COMPONENTS: dict[str, tuple[str, ...]] = {
    "rapl-sysfs": RAPL_COMPONENTS,
    "rapl-msr": RAPL_COMPONENTS,
    "trained_power_model": RAPL_COMPONENTS,
    "acpi": PLATFORM_COMPONENTS,
    "hmc": PLATFORM_COMPONENTS,
    "redfish": PLATFORM_COMPONENTS,
}


class UnknownSourceError(ValueError):
    """An energy source name that Kepler does not know."""


def normalise_source(source: str | None) -> str:
    """Map a requested energy source onto Kepler's names.

    A missing source, or any name containing ``rapl`` that is not a known name, means
    ``rapl-sysfs``.
    """
    if not source:
        return DEFAULT_SOURCE
    if source in SOURCE_COMPONENTS:
        return source
    if "rapl" in source:
        return DEFAULT_SOURCE
    raise UnknownSourceError(
        f"unknown energy source {source!r}; known: {', '.join(SOURCE_COMPONENTS)}"
    )


def components_of(source: str) -> tuple[str, ...]:
    return SOURCE_COMPONENTS[normalise_source(source)]


# Kepler's own label value for the node energy series -> the source it measures.
PROMETHEUS_SOURCE_LABELS: dict[str, str] = {
    "rapl": "rapl-sysfs",
    "rapl-sysfs": "rapl-sysfs",
    "rapl-msr": "rapl-msr",
    "acpi": "acpi",
    "hmc": "hmc",
    "redfish": "redfish",
    "trained": "trained_power_model",
}

SYSTEM_FEATURES: tuple[str, ...] = ("cpu_scaling_frequency_hertz", "node_info")
ACCELERATOR_FEATURE = "accelerator_intel_qat"

_FULL = (
    "accelerator_intel_qat",
    "bpf_block_irq",
    "bpf_cpu_time_ms",
    "bpf_net_rx_irq",
    "bpf_net_tx_irq",
    "bpf_page_cache_hit",
    "cache_miss",
    "cpu_cycles",
    "cpu_instructions",
    "cpu_scaling_frequency_hertz",
    "node_info",
)

# In the order Kepler lists them; each list sorted, which is the model's feature order.
FEATURE_GROUPS: dict[str, tuple[str, ...]] = {
    "Full": _FULL,
    "WorkloadOnly": tuple(f for f in _FULL if f not in SYSTEM_FEATURES),
    "CounterOnly": ("cache_miss", "cpu_cycles", "cpu_instructions"),
    "BPFOnly": ("bpf_cpu_time_ms", "bpf_page_cache_hit"),
    "BPFIRQ": (
        "bpf_block_irq",
        "bpf_cpu_time_ms",
        "bpf_net_rx_irq",
        "bpf_net_tx_irq",
        "bpf_page_cache_hit",
    ),
    "CounterIRQCombined": (
        "bpf_block_irq",
        "bpf_net_rx_irq",
        "bpf_net_tx_irq",
        "cache_miss",
        "cpu_cycles",
        "cpu_instructions",
    ),
    "Basic": (
        "bpf_cpu_time_ms",
        "bpf_page_cache_hit",
        "cache_miss",
        "cpu_cycles",
        "cpu_instructions",
    ),
    "AcceleratorOnly": ("accelerator_intel_qat",),
}

WORKLOAD_FEATURES: tuple[str, ...] = tuple(
    f for f in _FULL if f not in SYSTEM_FEATURES and f != ACCELERATOR_FEATURE
)


def group_features(group: str, thirdparty: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The sorted feature list of a group; ThirdParty metrics extend WorkloadOnly."""
    if group == "ThirdParty":
        return tuple(sorted(thirdparty))
    if group == "WorkloadOnly" and thirdparty:
        return tuple(sorted(set(FEATURE_GROUPS[group]) | set(thirdparty)))
    return FEATURE_GROUPS[group]


def valid_groups(metrics: list[str] | tuple[str, ...] | set[str]) -> list[str]:
    """Groups whose features are all among ``metrics``, in the table's order."""
    available = set(metrics)
    return [g for g, feats in FEATURE_GROUPS.items() if set(feats) <= available]


def main_feature(group: str, component: str) -> str:
    """The single feature a curve-fit model of this group and component uses."""
    if group in ("BPFOnly", "BPFIRQ"):
        return "bpf_page_cache_hit" if component == "dram" else "bpf_cpu_time_ms"
    if group == "AcceleratorOnly":
        return ACCELERATOR_FEATURE
    return "cache_miss" if component == "dram" else "cpu_instructions"


TRAINER_NAMES: tuple[str, ...] = (
    "SGDRegressorTrainer",
    "LinearRegressionTrainer",
    "PolynomialRegressionTrainer",
    "GradientBoostingRegressorTrainer",
    "KNeighborsRegressorTrainer",
    "SVRRegressorTrainer",
    "XgboostFitTrainer",
    "LogarithmicRegressionTrainer",
    "ExponentialRegressionTrainer",
    "LogisticRegressionTrainer",
)

LINEAR_WEIGHT_TRAINERS: frozenset[str] = frozenset({"SGDRegressorTrainer"})
CURVE_FIT_TRAINERS: frozenset[str] = frozenset(
    {"LogarithmicRegressionTrainer", "ExponentialRegressionTrainer", "LogisticRegressionTrainer"}
)
WEIGHT_TRAINERS: frozenset[str] = LINEAR_WEIGHT_TRAINERS | CURVE_FIT_TRAINERS

ISOLATOR_NAMES: dict[str, str] = {
    "MinIdleIsolator": "min",
    "NoneIsolator": "none",
    "ProfileBackgroundIsolator": "profile",
    "TrainIsolator": "trainer",
}


def model_name(trainer: str, node_type: int) -> str:
    return f"{trainer}_{node_type}"


def parse_model_name(name: str) -> tuple[str, int]:
    """Split ``<Trainer>_<node_type>`` at the last underscore; the node type is an integer."""
    trainer, sep, node_type = name.rpartition("_")
    if not sep or not trainer:
        raise ValueError(f"model name {name!r} is not <Trainer>_<node_type>")
    try:
        return trainer, int(node_type)
    except ValueError:
        raise ValueError(f"model name {name!r} does not end in an integer node type") from None
