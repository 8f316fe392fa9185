"""Isolation of the dynamic power that containers cause."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from modelling.extract import extract
from modelling.isolate import (
    IsolationInputError,
    IsolatorArgumentError,
    MinIdleIsolator,
    NoneIsolator,
    UnknownIsolatorError,
    make_isolator,
)
from storage.dumps import read_dump

COMPONENTS = ("package", "core")


def container_rows() -> pl.DataFrame:
    """Two containers on n1 and one on n2; node power repeats on every container row."""
    return pl.DataFrame(
        {
            "instance": ["n1", "n1", "n1", "n1", "n1", "n1", "n2", "n2"],
            "container_key": ["a", "b", "a", "b", "a", "b", "c", "c"],
            "timestamp": [3.0, 3.0, 6.0, 6.0, 9.0, 9.0, 3.0, 6.0],
            "cpu_cycles": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
            "node_info": [1.0] * 8,
            "package_power": [50.0, 50.0, 80.0, 80.0, 65.0, 65.0, 20.0, 30.0],
            "core_power": [0.0] * 8,
        }
    )


def test_containers_are_summed_per_node_and_timestamp() -> None:
    result = NoneIsolator().isolate(container_rows(), ["cpu_cycles", "node_info"], COMPONENTS)

    assert result.columns == [
        "instance",
        "timestamp",
        "cpu_cycles",
        "node_info",
        "package_power",
        "core_power",
    ]
    assert result["cpu_cycles"].to_list() == [3.0, 7.0, 11.0, 7.0, 8.0]
    # A node gauge repeated on each container row is not multiplied by the container count.
    assert result["node_info"].to_list() == [1.0] * 5


def test_none_isolator_keeps_node_power() -> None:
    result = NoneIsolator().isolate(container_rows(), ["cpu_cycles"], COMPONENTS)

    assert result["package_power"].to_list() == [50.0, 80.0, 65.0, 20.0, 30.0]


def test_min_idle_subtracts_each_nodes_own_minimum() -> None:
    result = MinIdleIsolator().isolate(container_rows(), ["cpu_cycles"], COMPONENTS)

    assert result["package_power"].to_list() == [0.0, 30.0, 15.0, 0.0, 10.0]


def test_all_zero_component_stays_zero() -> None:
    result = MinIdleIsolator().isolate(container_rows(), ["cpu_cycles"], COMPONENTS)

    assert result["core_power"].to_list() == [0.0] * 5


def test_missing_column_is_reported() -> None:
    with pytest.raises(IsolationInputError, match="dram_power"):
        MinIdleIsolator().isolate(container_rows(), ["cpu_cycles"], ["dram"])


def test_min_idle_on_real_data_is_never_negative_and_touches_zero(workload_dump: Path) -> None:
    extraction = extract(read_dump(workload_dump))
    frame = extraction.group_frame("CounterOnly", "container")

    result = MinIdleIsolator().isolate(
        frame, ["cache_miss", "cpu_cycles", "cpu_instructions"], extraction.components
    )

    powers = result.select(f"{c}_power" for c in extraction.components)
    assert powers.min().row(0) == (0.0,) * len(extraction.components)
    assert result["package_power"].to_numpy().max() > 100
    assert result.height == extraction.node.height


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("MinIdleIsolator", MinIdleIsolator),
        ("min", MinIdleIsolator),
        ("NoneIsolator", NoneIsolator),
        ("none", NoneIsolator),
    ],
)
def test_make_isolator_accepts_class_and_metadata_names(name: str, expected: type) -> None:
    isolator = make_isolator(name)

    assert isinstance(isolator, expected)
    assert isolator.name in ("min", "none")


def test_unknown_isolator_is_rejected() -> None:
    with pytest.raises(UnknownIsolatorError, match="unknown isolator"):
        make_isolator("median")


def test_isolator_that_needs_an_idle_profile_says_so() -> None:
    with pytest.raises(IsolatorArgumentError, match="missing a required argument: 'profile'"):
        make_isolator("profile")


def test_arguments_an_isolator_does_not_take_are_refused_by_name() -> None:
    with pytest.raises(IsolatorArgumentError, match="bogus"):
        make_isolator("MinIdleIsolator", bogus=1)
