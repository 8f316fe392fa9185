"""Idle profiles from an idle run: the real 2024 idle dump, and small made-up runs."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from kepler_model.cli import app
from modelling.profile import (
    IdleProfile,
    ProfileError,
    build_profiles,
    read_profile,
    write_profiles,
)
from storage.dumps import dump_to_frame, read_dump

Dump = dict[str, list[dict[str, Any]]]


@pytest.fixture(scope="module")
def raw_idle(idle_dump: Path) -> Dump:
    with gzip.open(idle_dump, "rt") as stream:
        body: Dump = json.load(stream)
    return body


@pytest.fixture(scope="module")
def profiles(idle_dump: Path) -> dict[str, IdleProfile]:
    return build_profiles(read_dump(idle_dump))


def counters_watts(dump: Dump, metric: str, source: str) -> float:
    """Energy over time straight from the counters: sum of every series (mode, package), from
    the first sample to the last new reading (the dump repeats the final one 3 s later)."""
    series = [s for s in dump[metric] if s["metric"].get("source") == source]
    times = [float(t) for t, _ in series[0]["values"]]
    total = [sum(float(s["values"][i][1]) for s in series) for i in range(len(times))]
    last = total.index(total[-1])
    return (total[last] - total[0]) / (times[last] - times[0])


def test_package_idle_power_is_the_counters_energy_over_time(
    profiles: dict[str, IdleProfile], raw_idle: Dump
) -> None:
    package = profiles["rapl-sysfs"].node_types[0]["package"]
    expected = counters_watts(raw_idle, "kepler_node_package_joules_total", "rapl-sysfs")

    assert package.mean_watts == pytest.approx(expected, rel=0.01)
    assert package.min_watts <= package.mean_watts <= package.max_watts
    assert package.units == 2  # packages 0 and 1


def test_every_component_and_source_of_the_run_is_profiled(
    profiles: dict[str, IdleProfile], raw_idle: Dump
) -> None:
    rapl = profiles["rapl-sysfs"].node_types[0]
    platform = profiles["acpi"].node_types[0]["platform"]

    assert set(profiles) == {"rapl-sysfs", "acpi"}  # the GPU's "nvidia" source is not ours
    assert set(rapl) == {"package", "core", "uncore", "dram"}
    assert rapl["dram"].mean_watts == pytest.approx(
        counters_watts(raw_idle, "kepler_node_dram_joules_total", "rapl-sysfs"), rel=0.01
    )
    assert platform.mean_watts == pytest.approx(
        counters_watts(raw_idle, "kepler_node_platform_joules_total", "acpi"), rel=0.01
    )
    assert platform.units == 1


def test_counters_that_never_advance_are_a_constant_zero(
    profiles: dict[str, IdleProfile],
) -> None:
    core = profiles["rapl-sysfs"].node_types[0]["core"]

    assert (core.min_watts, core.max_watts, core.mean_watts, core.intervals) == (0, 0, 0, 0)


def test_background_containers_are_those_of_the_run(
    profiles: dict[str, IdleProfile], raw_idle: Dump
) -> None:
    seen = {
        "/".join(
            s["metric"].get(k, "") for k in ("container_namespace", "pod_name", "container_name")
        )
        for s in raw_idle["kepler_container_cpu_cycles_total"]
    }

    assert set(profiles["rapl-sysfs"].background_containers) == seen
    assert "kube-system/etcd-kind-fms-control-plane/etcd" in seen


def node_energy(values: list[tuple[float, float]], **labels: str) -> dict[str, Any]:
    metric = {"instance": "n1", "source": "rapl-sysfs", "package": "0", "mode": "idle", **labels}
    return {"metric": metric, "values": [[t, str(v)] for t, v in values]}


def profile_of(series: list[dict[str, Any]], **kwargs: Any) -> IdleProfile:
    frame = dump_to_frame({"kepler_node_package_joules_total": series})
    return build_profiles(frame, **kwargs)["rapl-sysfs"]


def test_repeated_readings_are_merged_into_the_next_step_not_counted_as_zero() -> None:
    # 10 W throughout; the readings at 20 and 50 repeat the previous scrape.
    values = [(0, 0), (10, 100), (20, 100), (30, 300), (40, 400), (50, 400)]

    package = profile_of([node_energy(values)]).node_types[0]["package"]

    assert (package.min_watts, package.max_watts, package.mean_watts) == (10, 10, 10)
    assert (package.intervals, package.seconds) == (3, 40)


def test_modes_and_packages_are_summed_and_counted_as_units() -> None:
    steps = [(0, 0), (10, 50), (20, 100)]
    series = [
        node_energy(steps, package=p, mode=m) for p in ("0", "1") for m in ("idle", "dynamic")
    ]

    package = profile_of(series).node_types[0]["package"]

    assert package.mean_watts == 20  # four series of 5 W each
    assert package.units == 2


def test_a_counter_reset_is_not_a_step() -> None:
    values = [(0, 1000), (10, 1100), (20, 50), (30, 150)]

    package = profile_of([node_energy(values)]).node_types[0]["package"]

    assert (package.min_watts, package.max_watts, package.intervals) == (10, 10, 2)


def test_instances_may_be_of_different_node_types() -> None:
    series = [
        node_energy([(0, 0), (10, 100)], instance="a"),
        node_energy([(0, 0), (10, 300)], instance="b"),
    ]

    profile = profile_of(series, node_type=3, instance_node_types={"b": 7})

    assert profile.background_watts(3, "package") == 10
    assert profile.background_watts(7, "package") == 30
    assert dict(profile.instances) == {"a": 3, "b": 7}


def test_asking_for_what_the_run_did_not_see_says_so() -> None:
    profile = profile_of([node_energy([(0, 0), (10, 100)])])

    with pytest.raises(ProfileError, match="no node type 2"):
        profile.background_watts(2, "package")
    with pytest.raises(ProfileError, match="has no dram"):
        profile.background_watts(0, "dram")


def test_a_run_without_node_energy_cannot_be_profiled() -> None:
    frame = dump_to_frame({"kepler_container_cpu_cycles_total": []})

    with pytest.raises(ProfileError, match="no node energy"):
        build_profiles(frame)


def test_profiles_are_written_per_source_and_read_back(
    profiles: dict[str, IdleProfile], tmp_path: Path
) -> None:
    written = write_profiles(profiles, tmp_path)

    assert written == [tmp_path / "profile" / "acpi.json", tmp_path / "profile" / "rapl-sysfs.json"]
    again = read_profile(tmp_path, "rapl-sysfs")
    assert again.to_json() == json.loads(written[1].read_text())
    assert again.background_watts(0, "package") == pytest.approx(
        profiles["rapl-sysfs"].background_watts(0, "package"), abs=1e-4
    )


def test_a_file_that_is_not_a_profile_is_refused(tmp_path: Path) -> None:
    (tmp_path / "rapl-sysfs.json").write_text('{"source": "rapl-sysfs"}')

    with pytest.raises(ProfileError, match="not an idle profile"):
        read_profile(tmp_path / "rapl-sysfs.json")


@pytest.mark.usefixtures("prefect_harness")
def test_profile_flow_writes_the_profiles(idle_dump: Path, tmp_path: Path) -> None:
    from flows.profile import profile

    result = profile(input=str(idle_dump), output=str(tmp_path), node_type=2)

    assert result["files"] == [
        str(tmp_path / "profile" / "acpi.json"),
        str(tmp_path / "profile" / "rapl-sysfs.json"),
    ]
    assert set(result["profiles"]["rapl-sysfs"]["node_types"]) == {"2"}


@pytest.mark.usefixtures("prefect_harness")
def test_cli_profile_writes_and_reports_the_profiles(idle_dump: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["profile", "--input", str(idle_dump), "--output", str(tmp_path)]
    )

    assert result.exit_code == 0, result.output
    assert "rapl-sysfs node type 0 package: 117.71 W" in result.output
    assert (tmp_path / "profile" / "rapl-sysfs.json").is_file()
