"""The isolators that know the background from an idle run: ``profile`` and ``trainer``."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from modelling.components import ConstantComponent, LinearComponent
from modelling.extract import extract
from modelling.isolate import (
    IsolationInputError,
    IsolatorArgumentError,
    ProfileBackgroundIsolator,
    TrainIsolator,
    isolator_name,
    make_isolator,
    needs_idle_profile,
)
from modelling.power_model import PowerModel
from modelling.profile import IdlePower, IdleProfile, build_profiles, write_profiles
from storage.dumps import read_dump

COMPONENTS = ("package", "dram")
FEATURES = ["cpu_cycles", "node_info"]
AGENT = "kube-system/agent-x/agent"  # ran in the idle run
APP = "default/app-1/app"


def idle(package: float, dram: float, units: int = 2) -> dict[str, IdlePower]:
    return {
        "package": IdlePower(package, package, package, units, 3, 30.0),
        "dram": IdlePower(dram, dram, dram, units, 3, 30.0),
    }


PROFILE = IdleProfile(
    source="rapl-sysfs",
    node_types={0: idle(40.0, 5.0), 1: idle(90.0, 12.0)},
    background_containers=(AGENT,),
)


def rows(node_power: dict[float, float], usage: list[tuple[float, str, float]]) -> pl.DataFrame:
    """Container rows of node n1: (timestamp, ``ns/pod/container``, cpu cycles per second);
    ``node_power`` gives package watts per timestamp, dram is a tenth of it."""
    return pl.DataFrame(
        {
            "instance": ["n1"] * len(usage),
            "container_key": [f"{key}/id-{i}" for i, (_, key, _) in enumerate(usage)],
            "timestamp": [t for t, _, _ in usage],
            "cpu_cycles": [c for _, _, c in usage],
            "node_info": [1.0] * len(usage),
            "package_power": [node_power[t] for t, _, _ in usage],
            "dram_power": [node_power[t] / 10 for t, _, _ in usage],
        }
    )


CONTAINERS = rows(
    {3.0: 100.0, 6.0: 30.0, 9.0: 60.0},
    [(3.0, AGENT, 5.0), (3.0, APP, 20.0), (6.0, AGENT, 4.0), (9.0, APP, 8.0)],
)


def test_profile_isolator_drops_background_usage_and_subtracts_idle_power() -> None:
    result = ProfileBackgroundIsolator(profile=PROFILE, node_type=0).isolate(
        CONTAINERS, FEATURES, COMPONENTS
    )

    assert result["timestamp"].to_list() == [3.0, 6.0, 9.0]
    # At 6 s only the background ran: its usage is gone, the row stays with zero usage.
    assert result["cpu_cycles"].to_list() == [20.0, 0.0, 8.0]
    assert result["node_info"].to_list() == [1.0, 1.0, 1.0]
    # 30 W at 6 s is below the 40 W idle: clipped at 0, never negative.
    assert result["package_power"].to_list() == [60.0, 0.0, 20.0]
    assert result["dram_power"].to_list() == [5.0, 0.0, 1.0]


def test_rows_below_the_idle_power_are_counted_in_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="modelling.isolate"):
        ProfileBackgroundIsolator(profile=PROFILE, node_type=0).isolate(
            CONTAINERS, FEATURES, COMPONENTS
        )

    assert "1 of 3 rows draw less package power than the background" in caplog.text


def test_a_restarted_background_container_is_still_background() -> None:
    restarted = CONTAINERS.with_columns(pl.col("container_key").str.replace(r"id-\d+$", "new-id"))

    result = ProfileBackgroundIsolator(profile=PROFILE, node_type=0).isolate(
        restarted, FEATURES, COMPONENTS
    )

    assert result["cpu_cycles"].to_list() == [20.0, 0.0, 8.0]


def test_background_is_recognised_by_the_label_columns_too() -> None:
    labelled = CONTAINERS.with_columns(
        pl.col("container_key").str.split("/").list.get(0).alias("container_namespace"),
        pl.col("container_key").str.split("/").list.get(1).alias("pod_name"),
        pl.col("container_key").str.split("/").list.get(2).alias("container_name"),
        pl.lit("opaque").alias("container_key"),
    )

    result = ProfileBackgroundIsolator(profile=PROFILE, node_type=0).isolate(
        labelled, FEATURES, COMPONENTS
    )

    assert result["cpu_cycles"].to_list() == [20.0, 0.0, 8.0]


def test_the_rows_node_type_chooses_the_idle_power() -> None:
    by_instance = ProfileBackgroundIsolator(profile=PROFILE, instance_node_types={"n1": 1})

    result = by_instance.isolate(CONTAINERS, FEATURES, COMPONENTS)

    assert result["package_power"].to_list() == [10.0, 0.0, 0.0]


def test_a_node_type_the_profile_lacks_is_an_error() -> None:
    isolator = ProfileBackgroundIsolator(profile=PROFILE, node_type=5)

    with pytest.raises(IsolationInputError, match="no node type 5"):
        isolator.isolate(CONTAINERS, FEATURES, COMPONENTS)


def test_the_node_type_must_be_given_when_the_profile_has_several() -> None:
    with pytest.raises(IsolationInputError, match="node type of n1 unknown"):
        ProfileBackgroundIsolator(profile=PROFILE).isolate(CONTAINERS, FEATURES, COMPONENTS)


def test_profile_may_be_given_as_json_or_as_a_folder(tmp_path: Path) -> None:
    write_profiles({"rapl-sysfs": PROFILE}, tmp_path)
    expected = ProfileBackgroundIsolator(profile=PROFILE, node_type=0).isolate(
        CONTAINERS, FEATURES, COMPONENTS
    )

    for given in (PROFILE.to_json(), tmp_path, str(tmp_path / "profile" / "rapl-sysfs.json")):
        isolator = make_isolator("profile", profile=given, node_type=0)
        assert isolator.isolate(CONTAINERS, FEATURES, COMPONENTS).equals(expected)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ProfileBackgroundIsolator", ProfileBackgroundIsolator),
        ("profile", ProfileBackgroundIsolator),
        ("TrainIsolator", TrainIsolator),
        ("trainer", TrainIsolator),
    ],
)
def test_selectable_by_class_and_metadata_name(name: str, expected: type) -> None:
    isolator = make_isolator(name, profile=PROFILE)

    assert isinstance(isolator, expected)
    assert isolator.name in ("profile", "trainer")


@pytest.mark.parametrize("name", ["profile", "trainer"])
def test_an_idle_profile_is_required(name: str) -> None:
    with pytest.raises(IsolatorArgumentError, match="profile"):
        make_isolator(name)


@pytest.mark.parametrize(
    ("name", "short", "needs_profile"),
    [
        ("ProfileBackgroundIsolator", "profile", True),
        ("trainer", "trainer", True),
        ("MinIdleIsolator", "min", False),
        ("none", "none", False),
    ],
)
def test_the_metadata_name_and_profile_need_are_known_without_building(
    name: str, short: str, needs_profile: bool
) -> None:
    assert isolator_name(name) == short
    assert needs_idle_profile(name) is needs_profile


def linear_model(name: str, mae: float, bias: float = 50.0, slope: float = 2.0) -> PowerModel:
    """AbsPower on cpu_cycles and node_info: package = bias + slope * cycles, dram a tenth."""
    return PowerModel(
        name,
        ("cpu_cycles", "node_info"),
        np.array([1.0, 1.0]),
        {
            "package": LinearComponent(bias, (slope, 0.0)),
            "dram": LinearComponent(bias / 10, (slope / 10, 0.0)),
        },
        {"output_type": "AbsPower", "mae": mae},
    )


def linear_node(usage: list[tuple[float, str, float]]) -> pl.DataFrame:
    """Rows whose node power is exactly 50 W + 2 W per cycle of every container."""
    totals: dict[float, float] = {}
    for t, _, cycles in usage:
        totals[t] = totals.get(t, 0.0) + cycles
    return rows({t: 50.0 + 2.0 * c for t, c in totals.items()}, usage)


LINEAR = linear_node(
    [(float(t), AGENT, 1.0 + t % 3) for t in range(0, 60, 3)]
    + [(float(t), APP, float(t % 7) * 5) for t in range(0, 60, 3)]
)


def app_cycles(frame: pl.DataFrame) -> np.ndarray:
    app = frame.filter(pl.col("container_key").str.starts_with(APP))
    return app.sort("timestamp")["cpu_cycles"].to_numpy()


def test_train_isolator_subtracts_the_predicted_background() -> None:
    isolator = TrainIsolator(profile=PROFILE, abs_models=[linear_model("SGD_0", 3.0)])

    result = isolator.isolate(LINEAR, FEATURES, COMPONENTS)

    # node - (50 + 2 x background cycles) = 2 x the workload's cycles
    assert result["package_power"].to_numpy() == pytest.approx(2 * app_cycles(LINEAR))
    assert result["dram_power"].to_numpy() == pytest.approx(0.2 * app_cycles(LINEAR))
    assert result["cpu_cycles"].to_numpy() == pytest.approx(app_cycles(LINEAR))


def test_train_isolator_uses_the_best_usable_model() -> None:
    wrong_features = PowerModel(
        "other_0",
        ("cache_miss",),
        np.array([1.0]),
        {"package": ConstantComponent(0.0), "dram": ConstantComponent(0.0)},
        {"output_type": "AbsPower", "mae": 0.0},
    )
    models = [linear_model("worse_0", 9.0, bias=10.0), linear_model("best_0", 1.0), wrong_features]

    chosen = TrainIsolator(profile=PROFILE, abs_models=models).background_model(
        LINEAR, FEATURES, COMPONENTS
    )

    assert chosen.name == "best_0"


def test_train_isolator_fits_its_own_model_when_given_none() -> None:
    isolator = TrainIsolator(profile=PROFILE, trainers=["LinearRegressionTrainer"])

    result = isolator.isolate(LINEAR, FEATURES, COMPONENTS)

    assert result["package_power"].to_numpy() == pytest.approx(2 * app_cycles(LINEAR), abs=0.5)


def test_train_isolator_says_when_no_model_can_be_fitted() -> None:
    one_row = LINEAR.filter(pl.col("timestamp") == 0.0)

    with pytest.raises(IsolationInputError, match="no AbsPower model"):
        TrainIsolator(profile=PROFILE, trainers=["SGDRegressorTrainer"]).isolate(
            one_row, FEATURES, COMPONENTS
        )


def test_unknown_trainer_is_refused_when_the_isolator_is_made() -> None:
    with pytest.raises(ValueError, match="unknown trainer"):
        TrainIsolator(profile=PROFILE, trainers=["Nope"])


@pytest.mark.parametrize("name", ["profile", "trainer"])
def test_on_real_data_dynamic_power_is_never_negative_nor_above_node_power(
    name: str, workload_dump: Path, idle_dump: Path
) -> None:
    extraction = extract(read_dump(workload_dump))
    features = ["cache_miss", "cpu_cycles", "cpu_instructions"]
    frame = extraction.group_frame("CounterOnly", "container")
    profile = build_profiles(read_dump(idle_dump))["rapl-sysfs"]

    result = make_isolator(name, profile=profile).isolate(frame, features, extraction.components)

    assert result.height == extraction.node.height
    node = extraction.node.sort("instance", "timestamp")
    for component in extraction.components:
        dynamic = result[f"{component}_power"].to_numpy()
        assert dynamic.min() >= 0
        assert np.all(dynamic <= node[f"{component}_power"].to_numpy() + 1e-9)
    assert result["package_power"].max() > 0  # type: ignore[operator]
