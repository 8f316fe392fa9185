"""Versioned publication: every publish a new version, atomic switches, rollback, prune, and a
publisher killed at random points that never disturbs the version being served."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from kepler_model.cli import app as cli
from kepler_model.settings import Settings
from modelling.components import ComponentModel, LinearComponent
from modelling.power_model import PowerModel
from serving.model_server import create_app
from storage.catalogue import scan
from storage.pipelines import (
    PipelineNotFoundError,
    PublishedModel,
    current_version,
    list_versions,
    prune,
    publish,
    published_pipelines,
    rollback,
    versions_root,
)
from tests.conftest import running_server

ROOT = Path(__file__).resolve().parent.parent
FEATURES = ("bpf_cpu_time_ms", "bpf_page_cache_hit")
COMPONENTS = ("package", "core", "uncore", "dram")
NAME = "versioned"
MODELS_PER_PUBLISH = 24
GROUP = ("rapl-sysfs", "AbsPower", "BPFOnly")


def generation_model(generation: int, node_type: int) -> PowerModel:
    """A linear model whose every number says which publish wrote it."""
    name = f"SGDRegressorTrainer_{node_type}"
    components: dict[str, ComponentModel] = {
        c: LinearComponent(float(generation), (1.0, 0.0)) for c in COMPONENTS
    }
    metadata = {
        "model_name": name,
        "model_class": "scikit",
        "model_file": f"{name}.json",
        "features": list(FEATURES),
        "fe_files": ["scaler.json"],
        "output_type": "AbsPower",
        "trainer": "SGDRegressorTrainer",
        "feature_group": "BPFOnly",
        "node_type": node_type,
        "mae": 1.0,
        "mape": 1.0,
        "generation": generation,
    }
    return PowerModel(name, FEATURES, np.ones(len(FEATURES)), components, metadata)


def publish_generation(model_path: Path, generation: int, count: int = 2) -> Path:
    models = [PublishedModel(*GROUP, generation_model(generation, n)) for n in range(count)]
    return publish(model_path, NAME, models, {"generation": generation}, {})


def served_generation(model_path: Path) -> int:
    return int(json.loads((model_path / NAME / "metadata.json").read_text())["generation"])


def check_complete(version: Path) -> int:
    """Every file of a version is present and written by the same publish; returns which."""
    generation = int(json.loads((version / "metadata.json").read_text())["generation"])
    assert (version / "node_type_index.json").is_file()
    assert (version / "rapl-sysfs_AbsPower_model_metadata.csv").is_file()
    archives = sorted((version / "/".join(GROUP)).glob("*.zip"))
    assert archives, f"{version} has no model"
    for archive in archives:
        with zipfile.ZipFile(archive) as handle:
            assert handle.testzip() is None
            assert json.loads(handle.read("metadata.json"))["generation"] == generation
        weights = json.loads(archive.with_suffix(".json").read_text())
        assert {weights[c]["All_Weights"]["Bias_Weight"] for c in COMPONENTS} == {generation}
    return generation


def test_each_publish_is_a_new_version_served_through_the_link(tmp_path: Path) -> None:
    publish_generation(tmp_path, 1)
    final = publish_generation(tmp_path, 2)

    assert list_versions(tmp_path, NAME) == [1, 2]
    assert current_version(tmp_path, NAME) == 2
    assert (tmp_path / NAME).is_symlink()
    assert (tmp_path / NAME).resolve() == final.resolve()
    assert json.loads((final / "metadata.json").read_text())["version"] == 2
    assert check_complete(versions_root(tmp_path, NAME) / "v1") == 1


def test_a_publish_keeps_the_models_it_does_not_replace(tmp_path: Path) -> None:
    publish_generation(tmp_path, 1, count=3)
    publish_generation(tmp_path, 2, count=1)

    served = sorted(p.name for p in (tmp_path / NAME / "/".join(GROUP)).glob("*.zip"))
    assert served == [f"SGDRegressorTrainer_{n}.zip" for n in range(3)]


def test_rollback_serves_the_previous_version_or_the_one_named(tmp_path: Path) -> None:
    for generation in (1, 2, 3):
        publish_generation(tmp_path, generation)

    assert rollback(tmp_path, NAME) == 2
    assert served_generation(tmp_path) == 2
    assert rollback(tmp_path, NAME, to=3) == 3
    assert served_generation(tmp_path) == 3
    assert list_versions(tmp_path, NAME) == [1, 2, 3]


@pytest.mark.parametrize(
    ("name", "to", "words"),
    [(NAME, 7, "no version 7"), ("unknown", None, "no published versions")],
)
def test_rollback_to_a_missing_version_is_refused(
    tmp_path: Path, name: str, to: int | None, words: str
) -> None:
    publish_generation(tmp_path, 1)

    with pytest.raises(PipelineNotFoundError, match=words):
        rollback(tmp_path, name, to)

    assert current_version(tmp_path, NAME) == 1
    assert not versions_root(tmp_path, "unknown").exists()


def test_prune_keeps_the_newest_versions_and_the_served_one(tmp_path: Path) -> None:
    for generation in range(1, 6):
        publish_generation(tmp_path, generation)
    rollback(tmp_path, NAME, to=1)

    removed = prune(tmp_path, NAME, keep=2)

    assert removed == [2, 3]
    assert list_versions(tmp_path, NAME) == [1, 4, 5]
    assert served_generation(tmp_path) == 1


def test_a_hand_copied_pipeline_folder_becomes_the_first_version(tmp_path: Path) -> None:
    published = publish_generation(tmp_path / "elsewhere", 1)
    (tmp_path / NAME).mkdir()
    for path in published.rglob("*"):
        target = tmp_path / NAME / path.relative_to(published)
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            target.write_bytes(path.read_bytes())

    publish_generation(tmp_path, 2)

    assert list_versions(tmp_path, NAME) == [1, 2]
    assert check_complete(versions_root(tmp_path, NAME) / "v1") == 1
    assert served_generation(tmp_path) == 2


def test_an_adoption_killed_before_its_link_is_mended_by_the_next_publish(
    tmp_path: Path,
) -> None:
    publish_generation(tmp_path / "elsewhere", 1, count=3)
    # What a writer killed mid-adoption leaves: the folder renamed into the versions, no link.
    versions_root(tmp_path, NAME).mkdir(parents=True)
    (tmp_path / "elsewhere" / NAME).resolve().rename(versions_root(tmp_path, NAME) / "v1")

    publish_generation(tmp_path, 2, count=1)

    assert current_version(tmp_path, NAME) == 2
    served = tmp_path / NAME / "rapl-sysfs" / "AbsPower" / "BPFOnly"
    # The new model, and the two of the adopted version it did not replace.
    assert sorted(p.name for p in served.glob("*.zip")) == [
        f"SGDRegressorTrainer_{n}.zip" for n in range(3)
    ]


def test_leftovers_of_an_interrupted_publish_are_ignored_then_removed(tmp_path: Path) -> None:
    publish_generation(tmp_path, 1)
    staging = versions_root(tmp_path, NAME) / ".staging-dead"
    (staging / "metadata.json").parent.mkdir(parents=True)
    (staging / "metadata.json").write_text('{"generation": 99, "name": "versioned"}')
    stale_link = tmp_path / f".{NAME}.link-424242"
    stale_link.symlink_to(staging)

    catalogue = scan([tmp_path])
    assert list(catalogue.pipelines) == [NAME]
    assert list_versions(tmp_path, NAME) == [1]

    publish_generation(tmp_path, 2)

    assert not staging.exists() and not stale_link.is_symlink()
    assert list_versions(tmp_path, NAME) == [1, 2]


# The publisher that gets killed: publishes generation after generation until it is stopped,
# saying on stdout when each one is served and how long it took.
PUBLISHER = """
import sys, time
from pathlib import Path
from tests.test_pipelines import publish_generation
model_path, generation, count = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
while True:
    generation += 1
    started = time.perf_counter()
    publish_generation(model_path, generation, count)
    print(generation, time.perf_counter() - started, flush=True)
"""


def start_publisher(model_path: Path, generation: int) -> subprocess.Popen[str]:
    command = [sys.executable, "-c", PUBLISHER, str(model_path), str(generation)]
    return subprocess.Popen(
        [*command, str(MODELS_PER_PUBLISH)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )


def kill_at_random(publisher: subprocess.Popen[str], rng: random.Random) -> None:
    """After one complete publish, SIGKILL the publisher at a random point of later ones."""
    assert publisher.stdout is not None
    line = publisher.stdout.readline()
    assert line, "the publisher died before publishing"
    seconds = float(line.split()[1])
    time.sleep(rng.uniform(0.0, 2.0 * seconds))
    os.kill(publisher.pid, signal.SIGKILL)
    publisher.wait(timeout=30)


def leftovers(model_path: Path) -> list[Path]:
    staging = list(versions_root(model_path, NAME).glob(".staging-*"))
    return staging + list(model_path.glob(f".{NAME}.link-*"))


def served_bias(client: httpx.Client) -> float:
    request = {"metrics": list(FEATURES), "output_type": "AbsPower", "node_type": 0}
    reply = client.post("/model", json={**request, "weight": True})
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    return float(body["package"]["All_Weights"]["Bias_Weight"])


def wait_until_served(client: httpx.Client, generation: int) -> None:
    deadline = time.monotonic() + 10
    while served_bias(client) != generation:
        assert time.monotonic() < deadline, f"generation {generation} not served within 10 s"
        time.sleep(0.05)


@pytest.fixture
def model_server(tmp_path: Path) -> Iterator[httpx.Client]:
    settings = Settings(model_path=tmp_path, initial_pipeline_url="", default_pipeline=NAME)
    publish_generation(tmp_path, 1, MODELS_PER_PUBLISH)
    with running_server(create_app(settings)) as url, httpx.Client(base_url=url) as client:
        yield client


def test_killing_a_publisher_at_random_points_never_disturbs_the_served_version(
    tmp_path: Path, model_server: httpx.Client
) -> None:
    rng = random.Random(6)
    interrupted = 0
    for _ in range(6):
        before = served_generation(tmp_path)
        kill_at_random(start_publisher(tmp_path, before), rng)

        served = served_generation(tmp_path)
        assert served > before
        assert check_complete((tmp_path / NAME).resolve()) == served
        for version in list_versions(tmp_path, NAME):
            check_complete(versions_root(tmp_path, NAME) / f"v{version}")
        assert [p.name for p in scan([tmp_path]).pipelines.values()] == [NAME]
        wait_until_served(model_server, served)
        interrupted += bool(leftovers(tmp_path))

    assert interrupted >= 1, "no kill landed inside a publish"
    publish_generation(tmp_path, served_generation(tmp_path) + 1)
    assert leftovers(tmp_path) == []


def run_cli(*args: str) -> Any:
    result = CliRunner().invoke(cli, ["pipelines", *args])
    return result


def test_cli_lists_rolls_back_and_prunes(tmp_path: Path) -> None:
    for generation in (1, 2, 3):
        publish_generation(tmp_path, generation)
    where = ["--model-path", str(tmp_path)]

    listed = run_cli("list", *where)
    rolled = run_cli("rollback", NAME, "--to", "1", *where)
    pruned = run_cli("prune", "--keep", "1", *where)

    assert listed.exit_code == 0 and "versions v1, v2, v3" in listed.output
    assert "served    v3" in listed.output
    assert rolled.exit_code == 0 and "now serves version 1" in rolled.output
    assert pruned.exit_code == 0 and "removed v2" in pruned.output
    assert list_versions(tmp_path, NAME) == [1, 3]
    (summary,) = published_pipelines(tmp_path)
    assert (summary.current, summary.model_count) == (1, 2)


def test_cli_refuses_to_roll_back_an_unknown_pipeline(tmp_path: Path) -> None:
    result = run_cli("rollback", "nope", "--model-path", str(tmp_path))

    assert result.exit_code == 2
    assert "no published versions" in result.output
