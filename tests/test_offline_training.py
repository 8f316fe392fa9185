"""The offline-training flow on the real 2023 Kepler dump, through Prefect's test harness."""

from __future__ import annotations

import csv
import gzip
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flows.offline_training import offline_training
from modelling.power_model import PowerModel
from storage.samples import SampleStore

SUPPORTED_GROUPS = ("CounterOnly", "CounterIRQCombined")
TRAINERS = ("SGDRegressorTrainer", "GradientBoostingRegressorTrainer")


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory, workload_dump: Path, prefect_harness: None
) -> tuple[Path, Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("offline")
    model_path, db_path = root / "models", root / "kepler.duckdb"
    report = offline_training(
        input=str(workload_dump),
        pipeline="real-2023",
        model_path=str(model_path),
        db_path=str(db_path),
    )
    return model_path, db_path, report


def kepler_linear_watts(weights: dict[str, Any], metrics: list[str], rows: np.ndarray) -> dict:
    """Kepler's Go formula: P = Bias_Weight + sum(weight_i * value_i / scale_i)."""
    watts = {}
    for component, body in weights.items():
        variables = body["All_Weights"]["Numerical_Variables"]
        total = np.full(len(rows), body["All_Weights"]["Bias_Weight"])
        for column, metric in enumerate(metrics):
            scale = variables[metric]["scale"]
            x = rows[:, column] / scale if scale else 0.0
            total = total + variables[metric]["weight"] * x
        watts[component] = total
    return watts


def test_publishes_both_output_types_for_every_supported_group(trained) -> None:
    model_path, _, report = trained
    pipeline = model_path / "real-2023"
    for output_type in ("AbsPower", "DynPower"):
        for group in SUPPORTED_GROUPS:
            folder = pipeline / "rapl-sysfs" / output_type / group
            assert {p.name for p in folder.glob("*.zip")} == {f"{t}_0.zip" for t in TRAINERS}
            assert (folder / "SGDRegressorTrainer_0.json").is_file()
            assert not (folder / "GradientBoostingRegressorTrainer_0.json").exists()
    assert report["failures"] == []
    assert len(report["models"]) == 8


def test_groups_the_dump_cannot_support_are_skipped_with_a_reason(trained) -> None:
    _, _, report = trained
    assert "bpf_page_cache_hit" in report["skipped_groups"]["BPFOnly"]
    assert set(report["skipped_groups"]).isdisjoint(SUPPORTED_GROUPS)


def test_pipeline_metadata_has_the_published_fields(trained) -> None:
    model_path, _, _ = trained
    metadata = json.loads((model_path / "real-2023" / "metadata.json").read_text())
    for key in (
        "name",
        "isolator",
        "extractor",
        "abs_trainers",
        "dyn_trainers",
        "init_time",
        "last_update_time",
    ):
        assert key in metadata
    assert metadata["isolator"] == "min"
    assert metadata["feature_mappings"]["kepler_container_bpf_cpu_time_us_total"] == (
        "bpf_cpu_time_ms"
    )
    index = json.loads((model_path / "real-2023" / "node_type_index.json").read_text())
    assert "0" in index and "attrs" in index["0"]


def test_model_archive_holds_metadata_component_map_and_no_pickle(trained) -> None:
    model_path, _, _ = trained
    archive = (
        model_path / "real-2023/rapl-sysfs/AbsPower/CounterOnly/"
        "GradientBoostingRegressorTrainer_0.zip"
    )
    with zipfile.ZipFile(archive) as handle:
        names = set(handle.namelist())
        metadata = json.loads(handle.read("metadata.json"))
        component_map = json.loads(handle.read(metadata["model_file"]))
    assert not any(n.endswith(".pkl") for n in names)
    assert set(component_map) == {"package", "core", "uncore", "dram"}
    assert metadata["features"] == ["cache_miss", "cpu_cycles", "cpu_instructions"]
    for component in component_map:
        assert f"{component}_mae" in metadata and f"{component}_mape" in metadata
    assert metadata["mae"] == max(metadata[f"{c}_mae"] for c in component_map)


def test_model_csv_lists_every_model(trained) -> None:
    model_path, _, _ = trained
    table = model_path / "real-2023" / "rapl-sysfs_AbsPower_model_metadata.csv"
    with table.open() as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["feature_group"], r["trainer"]) for r in rows} == {
        (g, t) for g in SUPPORTED_GROUPS for t in TRAINERS
    }


def test_sgd_weights_evaluated_like_kepler_match_the_model(trained) -> None:
    model_path, _, _ = trained
    folder = model_path / "real-2023/rapl-sysfs/AbsPower/CounterIRQCombined"
    weights = json.loads((folder / "SGDRegressorTrainer_0.json").read_text())
    model = PowerModel.from_archive((folder / "SGDRegressorTrainer_0.zip").read_bytes())
    rng = np.random.default_rng(7)
    rows = rng.random((50, len(model.features))) * model.scale
    metrics = list(reversed(model.features))  # Kepler matches features by name, not position
    kepler = kepler_linear_watts(weights, metrics, rows[:, ::-1])
    ours = model.predict(rows)
    for component in ours:
        np.testing.assert_allclose(np.clip(kepler[component], 0, None), ours[component], rtol=1e-9)
    assert ours["package"].max() > 10.0


def test_dynamic_power_is_never_negative_and_lower_than_absolute(trained) -> None:
    model_path, _, _ = trained
    group = model_path / "real-2023/rapl-sysfs"
    absolute = PowerModel.from_archive(
        (group / "AbsPower/CounterOnly/SGDRegressorTrainer_0.zip").read_bytes()
    )
    dynamic = PowerModel.from_archive(
        (group / "DynPower/CounterOnly/SGDRegressorTrainer_0.zip").read_bytes()
    )
    rows = np.zeros((1, 3))
    assert dynamic.predict(rows)["package"][0] >= 0.0
    assert dynamic.predict(rows)["package"][0] < absolute.predict(rows)["package"][0]


def test_training_again_ingests_nothing_new_and_publishes_a_new_version(
    trained, workload_dump: Path
) -> None:
    model_path, db_path, first = trained
    with SampleStore(db_path) as store:
        before = store.count_samples()
    second = offline_training(
        input=str(workload_dump),
        pipeline="real-2023",
        model_path=str(model_path),
        db_path=str(db_path),
        abs_trainers=["SGDRegressorTrainer"],
        dyn_trainers=["SGDRegressorTrainer"],
    )
    with SampleStore(db_path) as store:
        assert store.count_samples() == before
    assert second["loads"][0]["samples_added"] == 0
    assert second["version"] == first["version"] + 1
    # models this run did not retrain are carried over into the new version
    carried = model_path / "real-2023/rapl-sysfs/AbsPower/CounterOnly"
    assert (carried / "GradientBoostingRegressorTrainer_0.zip").is_file()


def test_a_dump_trains_on_its_own_samples_not_on_those_the_store_kept(
    tmp_path: Path, workload_dump: Path, prefect_harness: None
) -> None:
    """The store keeps the first value of a sample; a later dump of the same series and times
    with other values (here every container counter unreadable) is trained on as it is."""
    with gzip.open(workload_dump) as handle:
        dump = json.load(handle)
    for metric, result in dump.items():
        if metric.startswith("kepler_container_"):
            for series in result:
                series["values"] = [[t, "NaN"] for t, _ in series["values"]]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(dump))
    stores = {"model_path": str(tmp_path / "models"), "db_path": str(tmp_path / "k.duckdb")}
    offline_training(input=str(workload_dump), pipeline="first", abs_trainers=SGD, **stores)

    report = offline_training(input=str(broken), pipeline="second", abs_trainers=SGD, **stores)

    assert report["loads"][0]["samples_added"] == 0  # the store had every one of them
    assert report["models"] == [] and not report["path"]
    assert "CounterOnly" in report["skipped_groups"]


SGD = ["SGDRegressorTrainer"]
XEON = {
    "processor": "Intel(R) Xeon(R) CPU E5-2686 v4 @ 2.30GHz",
    "cores": 72,
    "chips": 2,
    "memory": 503,
    "frequency": 3000,
}
EPYC = {"processor": "amd_epyc_7763", "cores": 128, "chips": 2, "memory": 512, "frequency": 3500}


def test_machine_specs_assign_node_types_and_keep_earlier_ones(
    tmp_path: Path, workload_dump: Path, prefect_harness: None
) -> None:
    common = {
        "input": str(workload_dump),
        "pipeline": "typed",
        "abs_trainers": SGD,
        "dyn_trainers": SGD,
        "model_path": str(tmp_path / "models"),
        "db_path": str(tmp_path / "db.duckdb"),
    }
    offline_training(**common, machine_spec=XEON)
    offline_training(**common, machine_spec=EPYC)

    pipeline = tmp_path / "models" / "typed"
    index = json.loads((pipeline / "node_type_index.json").read_text())
    assert index["0"]["attrs"]["processor"] == "intel_xeon_e5_2686v4"
    assert index["1"]["attrs"]["processor"] == "amd_epyc_7763"
    assert index["1"]["members"] == ["kind-control-plane"]
    assert index["0"]["members"] == []
    folder = pipeline / "rapl-sysfs" / "AbsPower" / "CounterOnly"
    assert {p.name for p in folder.glob("*.zip")} == {
        "SGDRegressorTrainer_0.zip",
        "SGDRegressorTrainer_1.zip",
    }
    with zipfile.ZipFile(folder / "SGDRegressorTrainer_1.zip") as archive:
        assert json.loads(archive.read("metadata.json"))["machine_spec"]["cores"] == 128


def test_profile_isolator_removes_the_idle_runs_background(
    tmp_path: Path, workload_dump: Path, idle_dump: Path, prefect_harness: None
) -> None:
    report = offline_training(
        input=str(workload_dump),
        idle=str(idle_dump),
        pipeline="profiled",
        isolator="ProfileBackgroundIsolator",
        abs_trainers=SGD,
        dyn_trainers=SGD,
        model_path=str(tmp_path / "models"),
        db_path=str(tmp_path / "db.duckdb"),
    )
    metadata = json.loads((tmp_path / "models/profiled/metadata.json").read_text())
    assert metadata["isolator"] == "profile"
    assert report["failures"] == []
    assert {m["output_type"] for m in report["models"]} == {"AbsPower", "DynPower"}


def test_profile_isolator_without_an_idle_run_fails_with_a_reason(
    tmp_path: Path, workload_dump: Path, prefect_harness: None
) -> None:
    with pytest.raises(ValueError, match="needs an idle run"):
        offline_training(
            input=str(workload_dump),
            pipeline="no-idle",
            isolator="profile",
            abs_trainers=SGD,
            dyn_trainers=SGD,
            model_path=str(tmp_path / "models"),
            db_path=str(tmp_path / "db.duckdb"),
        )
    assert not (tmp_path / "models" / "no-idle").exists()


def test_stores_left_out_are_those_of_the_settings(
    tmp_path: Path, workload_dump: Path, prefect_harness: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a deployment runs it on a worker: MODEL_PATH and DUCKDB_PATH from its environment."""
    monkeypatch.setenv("CONFIG_PATH", str(tmp_path / "no-config"))
    monkeypatch.setenv("MODEL_PATH", str(tmp_path / "worker-models"))
    monkeypatch.setenv("DUCKDB_PATH", str(tmp_path / "worker.duckdb"))

    report = offline_training(input=str(workload_dump), pipeline="from-env", abs_trainers=SGD)

    assert Path(report["path"]).is_relative_to(tmp_path / "worker-models")
    with SampleStore(tmp_path / "worker.duckdb") as store:
        assert store.count_samples() > 0
