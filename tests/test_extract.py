"""Extraction of feature rates and node power from Kepler's raw counters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from modelling.extract import Extraction, GroupUnavailableError, counter_rates, extract
from storage.dumps import dump_to_frame, read_dump

COUNTERS = ("cache_miss", "cpu_cycles", "cpu_instructions")
START = 1000.0
STEP = 3.0


def container(name: str, instance: str = "n1", **extra: str) -> dict[str, str]:
    return {
        "instance": instance,
        "container_id": f"id-{name}",
        "pod_name": f"pod-{name}",
        "container_name": name,
        "container_namespace": "default",
        **extra,
    }


def series(
    labels: dict[str, str], values: list[float], times: list[float] | None = None
) -> dict[str, Any]:
    stamps = times or [START + i * STEP for i in range(len(values))]
    return {"metric": labels, "values": [[t, str(v)] for t, v in zip(stamps, values, strict=True)]}


def package(values: list[float], instance: str = "n1", source: str = "rapl") -> dict[str, Any]:
    labels = {"instance": instance, "mode": "dynamic", "package": "0", "source": source}
    return series(labels, values)


def counters_dump(
    workload: dict[str, list[dict[str, Any]]], energy: list[dict[str, Any]]
) -> pl.DataFrame:
    """A dump holding CounterOnly features and package energy."""
    dump = {f"kepler_container_{f}_total": workload.get(f, []) for f in COUNTERS}
    return dump_to_frame({**dump, "kepler_node_package_joules_total": energy})


def steady(values: list[float], instance: str = "n1") -> dict[str, list[dict[str, Any]]]:
    return {f: [series(container("app", instance), values)] for f in COUNTERS}


@pytest.fixture(scope="module")
def workload(workload_dump: Path) -> Extraction:
    return extract(read_dump(workload_dump))


@pytest.fixture(scope="module")
def idle(idle_dump: Path) -> Extraction:
    return extract(read_dump(idle_dump))


def test_counter_reset_gives_no_negative_rate() -> None:
    frame = pl.DataFrame(
        {
            "series_id": [7] * 5,
            "timestamp": [0.0, 3.0, 6.0, 9.0, 12.0],
            "value": [10.0, 16.0, 2.0, 8.0, 20.0],
        }
    )

    rates = counter_rates(frame)["rate"].to_list()

    # First sample: no rate; the drop to 2 is a reset and a fresh start, not -4.67/s.
    assert rates == [None, 2.0, None, 2.0, 4.0]


def test_counter_reset_in_a_container_counter_is_skipped_not_negative() -> None:
    samples = counters_dump(steady([0, 30, 60, 3, 33]), [package([0, 300, 600, 900, 1200])])

    result = extract(samples)

    assert result.container["cpu_cycles"].to_list() == [10.0, 10.0, 10.0]
    assert result.container["timestamp"].to_list() == [1003.0, 1006.0, 1012.0]
    assert result.node["package_power"].to_list() == [100.0, 100.0, 100.0]


def test_node_power_sums_modes_and_packages_over_the_real_gap() -> None:
    times = [1000.0, 1003.0, 1009.0, 1012.0]
    dynamic_0 = {"instance": "n1", "mode": "dynamic", "package": "0", "source": "rapl"}
    idle_1 = {"instance": "n1", "mode": "idle", "package": "1", "source": "rapl"}
    energy = [series(dynamic_0, [0, 30, 90, 120], times), series(idle_1, [0, 60, 300, 360], times)]
    workload = {f: [series(container("app"), [0, 1, 2, 3], times)] for f in COUNTERS}

    result = extract(counters_dump(workload, energy))

    # (30 + 60) J over 3 s, then (60 + 240) J over the 6 s gap, then (30 + 60) J over 3 s.
    assert result.node["package_power"].to_list() == [30.0, 50.0, 30.0]


def test_rows_with_zero_power_in_every_component_are_dropped() -> None:
    samples = counters_dump(steady([0, 3, 6, 9]), [package([0, 30, 30, 60])])

    result = extract(samples)

    assert result.node["timestamp"].to_list() == [1003.0, 1009.0]
    assert result.container["timestamp"].to_list() == [1003.0, 1009.0]


def test_series_of_one_container_split_by_command_are_summed() -> None:
    workload = {
        f: [
            series(container("app", command="a"), [0, 3, 6]),
            series(container("app", command="b"), [0, 6, 12]),
        ]
        for f in COUNTERS
    }
    samples = counters_dump(workload, [package([0, 30, 60])])

    result = extract(samples)

    assert result.container["cpu_instructions"].to_list() == [3.0, 3.0]
    assert result.container["container_key"].unique().to_list() == ["default/pod-app/app/id-app"]


def test_instances_are_kept_apart() -> None:
    workload = {
        f: [series(container("a", "n1"), [0, 3, 6]), series(container("b", "n2"), [0, 30, 60])]
        for f in COUNTERS
    }
    samples = counters_dump(workload, [package([0, 30, 60], "n1"), package([0, 60, 120], "n2")])

    node = extract(samples).node

    by_instance = node.group_by("instance").agg(pl.col("cpu_cycles", "package_power").max())
    assert sorted(by_instance.rows()) == [("n1", 1.0, 10.0), ("n2", 10.0, 20.0)]


def test_group_with_fewer_than_two_timestamps_is_skipped() -> None:
    samples = counters_dump(steady([0, 3]), [package([0, 30])])

    result = extract(samples)

    assert result.valid_groups == ()
    assert "1 usable timestamp" in result.skipped_groups["CounterOnly"]
    with pytest.raises(GroupUnavailableError, match="usable timestamp"):
        result.group_frame("CounterOnly")


def test_workload_2023_supports_only_counter_groups(workload: Extraction) -> None:
    assert workload.valid_groups == ("CounterOnly", "CounterIRQCombined")
    assert "bpf_page_cache_hit" in workload.skipped_groups["BPFOnly"]
    assert "bpf_page_cache_hit" in workload.skipped_groups["Basic"]


def test_idle_2024_supports_bpf_groups(idle: Extraction) -> None:
    assert {"BPFOnly", "BPFIRQ", "Basic", "CounterOnly", "CounterIRQCombined"} <= set(
        idle.valid_groups
    )
    assert "bpf_page_cache_hit" in idle.features


def test_bpf_cpu_time_us_is_read_as_ms_and_recorded(workload: Extraction) -> None:
    assert workload.mappings["kepler_container_bpf_cpu_time_us_total"] == "bpf_cpu_time_ms"
    assert "bpf_cpu_time_ms" in workload.features

    # Milliseconds of CPU per second summed over containers: ~28 of 32 CPUs busy at the peak.
    peak = float(workload.node["bpf_cpu_time_ms"].to_numpy().max())
    assert 25_000 < peak < 32_000


def test_ms_counter_is_preferred_over_the_us_alias() -> None:
    dump = {
        "kepler_container_bpf_cpu_time_ms_total": [series(container("app"), [0, 3, 6])],
        "kepler_container_bpf_cpu_time_us_total": [series(container("app"), [0, 300, 600])],
        "kepler_node_package_joules_total": [package([0, 30, 60])],
    }

    result = extract(dump_to_frame(dump))

    assert result.node["bpf_cpu_time_ms"].to_list() == [1.0, 1.0]
    assert "kepler_container_bpf_cpu_time_us_total" not in result.mappings


def test_source_labels_are_mapped_and_recorded(workload: Extraction) -> None:
    assert workload.mappings["source=rapl"] == "rapl-sysfs"
    assert workload.mappings["source=acpi"] == "acpi"
    assert workload.components == ("package", "core", "uncore", "dram")


def test_package_power_has_plausible_watts(workload: Extraction) -> None:
    package_watts = workload.node["package_power"].to_numpy()

    # Two packages, idle plus dynamic: tens of watts idle, up to ~200 W under load.
    assert 20 < package_watts.min() < 60
    assert 100 < package_watts.max() < 250
    assert workload.node["core_power"].to_list() == [0.0] * workload.node.height


def test_acpi_source_reads_only_platform_energy(workload_dump: Path) -> None:
    result = extract(read_dump(workload_dump), source="acpi")

    assert result.components == ("platform",)
    assert "platform_power" in result.node.columns
    assert "package_power" not in result.node.columns
    assert 100 < float(result.node["platform_power"].to_numpy().mean()) < 500


def test_no_missing_or_infinite_value_reaches_the_output(workload: Extraction) -> None:
    for frame in (workload.node, workload.container):
        numeric = frame.select(pl.selectors.numeric())
        assert frame.null_count().sum_horizontal().item() == 0
        assert numeric.select(pl.all().is_finite().all()).row(0) == (True,) * numeric.width


def test_container_rows_carry_the_node_power_of_their_timestamp(workload: Extraction) -> None:
    joined = workload.container.join(workload.node, on=["instance", "timestamp"], suffix="_node")

    assert joined.height == workload.container.height
    assert (joined["package_power"] == joined["package_power_node"]).all()


def test_node_rates_are_the_sum_of_container_rates(idle: Extraction) -> None:
    summed = idle.container.group_by("timestamp").agg(pl.col("cpu_cycles").sum())
    both = summed.join(idle.node, on="timestamp", suffix="_node")

    assert both.height == idle.node.height
    assert np.allclose(both["cpu_cycles"].to_numpy(), both["cpu_cycles_node"].to_numpy())


def test_group_frame_has_keys_sorted_features_then_power(workload: Extraction) -> None:
    frame = workload.group_frame("CounterOnly", "container")

    assert frame.columns[:7] == [
        "instance",
        "container_key",
        "container_id",
        "pod_name",
        "container_name",
        "container_namespace",
        "timestamp",
    ]
    assert frame.columns[7:10] == ["cache_miss", "cpu_cycles", "cpu_instructions"]
    assert frame.columns[10:] == ["package_power", "core_power", "uncore_power", "dram_power"]


def test_skipped_group_frame_raises_with_reason(workload: Extraction) -> None:
    with pytest.raises(GroupUnavailableError, match="bpf_page_cache_hit"):
        workload.group_frame("BPFOnly", "node")
