"""The fan-out: every (trainer, group, output type, node type) a Prefect task, on threads or Dask.

The real 2023 dump is given two more machines: ``big-node`` (a full copy of the recorded one)
and ``tiny-node`` (its first two samples only, one usable timestamp: too little to train).
The node type index puts them in node types 1 and 2; the recorded machine is node type 0.
"""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flows import tasks
from flows.offline_training import offline_training
from flows.runners import UnknownTaskRunnerError, default_workers, make_task_runner
from modelling.power_model import PowerModel
from modelling.trainers import make_trainer

TRAINERS = ["SGDRegressorTrainer", "LogarithmicRegressionTrainer", "KNeighborsRegressorTrainer"]
GROUPS = ("CounterOnly", "CounterIRQCombined")
INDEX = {
    "1": {"attrs": {"processor": "big", "cores": 64}, "members": ["big-node"]},
    "2": {"attrs": {"processor": "tiny", "cores": 2}, "members": ["tiny-node"]},
}


def with_instance(series: dict[str, Any], instance: str, samples: int | None) -> dict[str, Any]:
    labels = {**series["metric"], "instance": instance}
    return {"metric": labels, "values": series["values"][:samples]}


@pytest.fixture(scope="module")
def three_machines(workload_dump: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    with gzip.open(workload_dump) as handle:
        dump = json.load(handle)
    extended = {
        metric: [
            *result,
            *(with_instance(s, "big-node", None) for s in result),
            *(with_instance(s, "tiny-node", 2) for s in result),
        ]
        for metric, result in dump.items()
    }
    path = tmp_path_factory.mktemp("dumps") / "three-machines.json"
    path.write_text(json.dumps(extended))
    return path


def train(
    dump: Path, folder: Path, runner: Any, pipeline: str, trainers: list[str] = TRAINERS
) -> dict[str, Any]:
    return offline_training.with_options(task_runner=runner)(
        input=str(dump),
        pipeline=pipeline,
        abs_trainers=trainers,
        dyn_trainers=trainers,
        model_path=str(folder / "models"),
        db_path=str(folder / "kepler.duckdb"),
        node_type_index=INDEX,
    )


@pytest.fixture(scope="module")
def on_threads(
    three_machines: Path, tmp_path_factory: pytest.TempPathFactory, prefect_harness: None
) -> tuple[Path, dict[str, Any]]:
    folder = tmp_path_factory.mktemp("threads")
    return folder / "models" / "threads", train(
        three_machines, folder, make_task_runner("thread"), "threads"
    )


@pytest.fixture(scope="module")
def local_dask_cluster() -> Iterator[str]:
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        yield cluster.scheduler_address


def published(pipeline: Path) -> set[tuple[str, str, str]]:
    return {
        (p.parent.parent.name, p.parent.name, p.stem) for p in pipeline.glob("rapl-sysfs/*/*/*.zip")
    }


def expected(
    node_types: tuple[int, ...], trainers: list[str] = TRAINERS
) -> set[tuple[str, str, str]]:
    return {
        (output_type, group, f"{trainer}_{nt}")
        for output_type in ("AbsPower", "DynPower")
        for group in GROUPS
        for trainer in trainers
        for nt in node_types
    }


def test_every_combination_is_fitted_and_the_healthy_node_types_published(on_threads) -> None:
    pipeline, report = on_threads
    assert published(pipeline) == expected((0, 1))
    assert len(report["models"]) == len(expected((0, 1)))


def test_a_node_type_too_small_to_train_is_reported_with_its_reason(on_threads) -> None:
    _, report = on_threads
    failures = report["failures"]
    assert len(failures) == len(expected((2,)))
    assert {f["node_type"] for f in failures} == {"2"}
    assert all("at least 2 are needed" in f["reason"] for f in failures)
    assert {(f["trainer"], f["feature_group"], f["output_type"]) for f in failures} == {
        (t, g, o) for t in TRAINERS for g in GROUPS for o in ("AbsPower", "DynPower")
    }


def test_node_types_train_on_their_own_machines_rows(on_threads) -> None:
    pipeline, _ = on_threads
    folder = pipeline / "rapl-sysfs/AbsPower/CounterOnly"
    for nt in (0, 1):
        model = PowerModel.from_archive((folder / f"SGDRegressorTrainer_{nt}.zip").read_bytes())
        assert model.metadata["node_type"] == nt
        assert model.metadata["train_rows"] + model.metadata["test_rows"] == 187
    big = PowerModel.from_archive((folder / "SGDRegressorTrainer_1.zip").read_bytes())
    assert big.metadata["machine_spec"] == INDEX["1"]["attrs"]
    index = json.loads((pipeline / "node_type_index.json").read_text())
    assert index["0"]["members"] == ["kind-control-plane"]
    assert index["1"]["members"] == ["big-node"] and index["2"]["members"] == ["tiny-node"]


def test_the_model_table_lists_every_published_model(on_threads) -> None:
    pipeline, _ = on_threads
    with (pipeline / "rapl-sysfs_DynPower_model_metadata.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["feature_group"], r["trainer"], r["node_type"]) for r in rows} == {
        (g, t, str(nt)) for g in GROUPS for t in TRAINERS for nt in (0, 1)
    }
    assert all(float(r["mae"]) >= 0.0 for r in rows)


def test_the_best_model_per_group_and_node_type_is_the_lowest_mae(on_threads) -> None:
    _, report = on_threads
    best = {
        (b["output_type"], b["feature_group"], b["node_type"]): b for b in report["best_models"]
    }
    assert len(best) == 2 * len(GROUPS) * 2
    for (output_type, group, node_type), winner in best.items():
        rivals = [
            m
            for m in report["models"]
            if (m["output_type"], m["feature_group"], m["node_type"])
            == (output_type, group, node_type)
        ]
        lowest = min(rivals, key=lambda m: m["mae"])
        assert winner["model_name"] == lowest["model_name"]
        assert winner["lead"] >= 0.0


def test_the_leaderboard_artifact_ranks_models_and_lists_failures(on_threads) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    _, report = on_threads
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["leaderboard-threads"]))
        )
    table = artifacts[0].data
    assert isinstance(table, str)  # Prefect keeps a table artifact as JSON text
    rows: list[dict[str, Any]] = json.loads(table)
    assert len(rows) == len(report["models"]) + len(report["failures"])
    first = [r for r in rows if r["rank"] == 1]
    assert len(first) == len(report["best_models"])
    assert all(r["failure"] for r in rows if r["rank"] is None)


def test_a_crashing_trainer_does_not_stop_the_others(
    three_machines: Path,
    tmp_path: Path,
    prefect_harness: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Broken:
        name = "LogarithmicRegressionTrainer"

        def fit_component(self, *args: Any, **kwargs: Any) -> Any:
            raise TypeError("a bug, not a fit that failed")

    def make(name: str) -> Any:
        return Broken() if name == "LogarithmicRegressionTrainer" else make_trainer(name)

    monkeypatch.setattr(tasks, "make_trainer", make)
    trainers = ["SGDRegressorTrainer", "LogarithmicRegressionTrainer"]
    runner = make_task_runner("thread", workers=2)
    report = train(three_machines, tmp_path, runner, "crashing", trainers)
    crashed = [f for f in report["failures"] if "task crashed" in f["reason"]]
    assert crashed and all(f["trainer"] == "LogarithmicRegressionTrainer" for f in crashed)
    assert "TypeError" in crashed[0]["reason"]
    survivors = published(tmp_path / "models" / "crashing")
    assert survivors == expected((0, 1), ["SGDRegressorTrainer"])


def test_a_dask_cluster_fits_the_same_models(
    three_machines: Path,
    tmp_path: Path,
    local_dask_cluster: str,
    prefect_harness: None,
    on_threads,
) -> None:
    # Each task costs Prefect-on-Dask about 0.2 s, so one trainer makes the point.
    trainer = "KNeighborsRegressorTrainer"
    runner = make_task_runner("dask", dask_address=local_dask_cluster)
    report = train(three_machines, tmp_path, runner, "dask", [trainer])
    pipeline = tmp_path / "models" / "dask"
    assert published(pipeline) == expected((0, 1), [trainer])
    assert {f["node_type"] for f in report["failures"]} == {"2"}
    threads_pipeline, _ = on_threads
    name = f"rapl-sysfs/DynPower/CounterIRQCombined/{trainer}_1.zip"
    on_dask = PowerModel.from_archive((pipeline / name).read_bytes())
    on_thread = PowerModel.from_archive((threads_pipeline / name).read_bytes())
    rows = np.random.default_rng(5).random((20, len(on_dask.features))) * on_dask.scale
    for component, watts in on_dask.predict(rows).items():
        np.testing.assert_array_equal(watts, on_thread.predict(rows)[component])


def test_an_unknown_task_runner_is_refused() -> None:
    with pytest.raises(UnknownTaskRunnerError, match="use 'thread' or 'dask'"):
        make_task_runner("processes")


def test_threads_default_to_one_per_cpu_and_dask_to_an_in_process_local_cluster() -> None:
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    threads = make_task_runner("thread")
    assert isinstance(threads, ThreadPoolTaskRunner)
    assert threads._max_workers == default_workers()
    local = make_task_runner("dask", workers=3)
    assert isinstance(local, DaskTaskRunner)
    assert local.cluster_kwargs["n_workers"] == 3 and local.cluster_kwargs["processes"] is False
    remote = make_task_runner("dask", dask_address="tcp://scheduler:8786")
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://scheduler:8786"
