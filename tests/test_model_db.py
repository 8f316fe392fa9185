"""Kepler's published model database served as Kepler asks for it (SPEC sections 5, 6, 8).

The pipeline is a trimmed copy of the real ec2-0.7.11 (tests/data/README.md). Its archives hold
pickles: they are served as bytes and never loaded. Every test talks to a real uvicorn server.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from estimator.models import ModelProvider, core_ratio
from kepler_model.settings import Settings
from modelling.machine_spec import MachineSpec
from serving.model_server import create_app
from storage.catalogue import ModelQuery
from tests.conftest import running_server

MODEL_DB = Path(__file__).parent / "data" / "model-db"
EC2 = MODEL_DB / "ec2-0.7.11"
BPF_ABS = EC2 / "rapl-sysfs" / "AbsPower" / "BPFOnly"
NODE_TYPES = json.loads((EC2 / "node_type_index.json").read_text())

# m5zn.metal, node type 4 of the pipeline.
M5ZN = {
    "processor": "intel_xeon_platinum_8252c",
    "cores": 48,
    "chips": 2,
    "memory": 188,
    "frequency": 4500,
}
# m7i.metal-48xl, two sockets of type 5's processor: no type covers it.
M7I_48XL = {
    "processor": "Intel(R) Xeon(R) Platinum 8488C",
    "cores": 192,
    "chips": 2,
    "memory": 755,
    "frequency": 3800,
}
SGD_REQUEST: dict[str, Any] = {
    "metrics": ["bpf_cpu_time_ms", "bpf_page_cache_hit"],
    "output_type": "AbsPower",
    "source": "rapl-sysfs",
    "trainer_name": "SGDRegressorTrainer",
    "weight": True,
}


@contextmanager
def running(app: Starlette) -> Iterator[httpx.Client]:
    with running_server(app) as url, httpx.Client(base_url=url, timeout=20) as client:
        yield client


@pytest.fixture(scope="module")
def model_db() -> Iterator[httpx.Client]:
    settings = Settings(model_path=MODEL_DB, initial_pipeline_url="", default_pipeline="ec2-0.7.11")
    with running(create_app(settings)) as client:
        yield client


def published_weights(name: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads((BPF_ABS / f"{name}.json").read_text())
    return body


def components_of(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if isinstance(v, dict) and "All_Weights" in v}


def test_machine_spec_of_node_type_4_gets_its_weights_unchanged(model_db: httpx.Client) -> None:
    reply = model_db.post("/model", json={**SGD_REQUEST, "machine_spec": M5ZN})

    assert reply.status_code == 200
    body = reply.json()
    assert components_of(body) == published_weights("SGDRegressorTrainer_4")
    assert body["model_name"] == "SGDRegressorTrainer_4"
    assert body["machine_spec"] == NODE_TYPES["4"]["attrs"]
    assert reply.headers["x-node-type"] == "4"
    assert reply.headers["x-node-type-matched"] == "true"
    assert reply.headers["x-node-type-similarity"] == "1.0000"
    assert reply.headers["x-node-type-uncertainty"] == "0.0000"


def test_without_a_machine_spec_the_lowest_error_wins(model_db: httpx.Client) -> None:
    reply = model_db.post("/model", json=SGD_REQUEST)

    # SGDRegressorTrainer_1 has the lowest MAE (18.35 W); type 4's is the highest (90.57 W).
    assert reply.headers["x-model-name"] == "SGDRegressorTrainer_1"
    assert "x-node-type-similarity" not in reply.headers


def test_uncovered_machine_gets_the_most_similar_type_and_its_uncertainty(
    model_db: httpx.Client,
) -> None:
    reply = model_db.post("/model", json={**SGD_REQUEST, "machine_spec": M7I_48XL})

    assert reply.status_code == 200
    assert components_of(reply.json()) == published_weights("SGDRegressorTrainer_5")
    assert reply.headers["x-node-type"] == "5"
    assert reply.headers["x-node-type-matched"] == "false"
    assert reply.headers["x-node-type-similarity"] == "0.7916"
    assert reply.headers["x-node-type-uncertainty"] == "0.2084"
    assert reply.headers["x-node-type-runner-up"] == "3"


def test_most_similar_type_with_a_model_is_chosen(model_db: httpx.Client) -> None:
    # c5.metal is node type 2, which has no SGD model here; type 0 is the closest that has one.
    c5 = {**M5ZN, "processor": "intel_xeon_platinum_8275cl", "cores": 96, "frequency": 3900}

    reply = model_db.post("/model", json={**SGD_REQUEST, "machine_spec": c5})

    assert reply.headers["x-node-type"] == "0"
    assert float(reply.headers["x-node-type-uncertainty"]) > 0.5


def test_strict_node_type_refuses_an_uncovered_machine(model_db: httpx.Client) -> None:
    request = {**SGD_REQUEST, "machine_spec": M7I_48XL, "loose_node_type": False}

    reply = model_db.post("/model", json=request)

    assert reply.status_code == 404
    searched = reply.json()["searched"]
    assert searched["machine_spec"]["processor"] == "intel_xeon_platinum_8488c"
    assert searched["loose_node_type"] is False


def test_requested_node_type_comes_before_the_machine_spec(model_db: httpx.Client) -> None:
    reply = model_db.post("/model", json={**SGD_REQUEST, "node_type": 1, "machine_spec": M5ZN})

    assert reply.headers["x-node-type"] == "1"
    assert reply.headers["x-node-type-matched"] == "true"
    assert float(reply.headers["x-node-type-similarity"]) < 0.5


def test_weight_false_returns_the_published_zip_bytes(model_db: httpx.Client) -> None:
    reply = model_db.post("/model", json={**SGD_REQUEST, "weight": False, "machine_spec": M5ZN})

    assert reply.status_code == 200
    assert reply.headers["content-type"] == "application/zip"
    assert reply.content == (BPF_ABS / "SGDRegressorTrainer_4.zip").read_bytes()


def test_pickled_archives_without_weights_are_served_as_bytes(model_db: httpx.Client) -> None:
    i3 = NODE_TYPES["1"]["attrs"]
    request = {"metrics": SGD_REQUEST["metrics"], "output_type": "DynPower", "machine_spec": i3}

    reply = model_db.post("/model", json=request)

    assert reply.headers["x-model-name"] == "GradientBoostingRegressorTrainer_1"
    dyn = EC2 / "rapl-sysfs" / "DynPower" / "BPFOnly" / "GradientBoostingRegressorTrainer_1.zip"
    assert reply.content == dyn.read_bytes()
    assert any(n.endswith(".pkl") for n in zipfile.ZipFile(io.BytesIO(reply.content)).namelist())


def test_pipelines_lists_the_node_types(model_db: httpx.Client) -> None:
    pipelines = model_db.get("/pipelines").json()["pipelines"]

    assert pipelines[0]["node_types"] == NODE_TYPES


def published_zip(folder: Path) -> bytes:
    """The pipeline as the model database publishes it: one top-level folder."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, f"{folder.name}/{path.relative_to(folder).as_posix()}")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def ec2_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("db") / "ec2-0.7.11.zip"
    path.write_bytes(published_zip(EC2))
    return path


@contextmanager
def web_server(files: dict[str, bytes]) -> Iterator[str]:
    async def serve(request: Request) -> Response:
        data = files.get(request.url.path)
        return Response(data, media_type="application/zip") if data else Response(b"", 404)

    with running_server(Starlette(routes=[Route("/{name}", serve)])) as url:
        yield url


@pytest.mark.parametrize("kind", ["zip path", "file:// zip", "file:// folder", "http zip"])
def test_initial_pipeline_loads_and_a_failing_url_is_logged_and_skipped(
    kind: str, ec2_zip: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    failing = tmp_path / "missing.zip"
    with web_server({"/ec2-0.7.11.zip": ec2_zip.read_bytes()}) as web:
        url = {
            "zip path": str(ec2_zip),
            "file:// zip": ec2_zip.as_uri(),
            "file:// folder": EC2.as_uri(),
            "http zip": f"{web}/ec2-0.7.11.zip",
        }[kind]
        settings = Settings(
            model_path=tmp_path / "empty", initial_pipeline_url=f"{failing.as_uri()}, {url}"
        )
        with caplog.at_level(logging.WARNING, logger="serving.initial_pipelines"):
            with running(create_app(settings)) as client:
                names = [p["name"] for p in client.get("/pipelines").json()["pipelines"]]
                reply = client.post(
                    "/model", json={**SGD_REQUEST, "weight": False, "machine_spec": M5ZN}
                )

    assert names == ["ec2-0.7.11"]
    assert reply.content == (BPF_ABS / "SGDRegressorTrainer_4.zip").read_bytes()
    skipped = [r.getMessage() for r in caplog.records if "skipping initial pipeline" in r.msg]
    assert len(skipped) == 1 and "missing.zip" in skipped[0]


def test_estimator_prefers_the_node_type_of_its_own_machine() -> None:
    settings = Settings(model_path=MODEL_DB, default_pipeline="ec2-0.7.11")
    query = ModelQuery(
        metrics=("bpf_cpu_time_ms", "bpf_page_cache_hit"),
        output_type="AbsPower",
        trainer_name="SGDRegressorTrainer",
    )
    provider = ModelProvider(settings, machine_spec=MachineSpec.from_mapping(M5ZN))
    try:
        model = provider.model_for(query)
    finally:
        provider.close()

    assert model.name == "SGDRegressorTrainer_4"
    # Kepler scales by this machine's cores over those of the model's machine (48).
    assert core_ratio(model, 48) == 1.0
    assert core_ratio(model, 96) == 2.0


def with_deflate_data_broken(archive: bytes) -> bytes:
    """The zip with every member's compressed bytes overwritten: its directory still reads,
    its members fail to inflate (zlib.error), as a disk or transfer fault leaves them."""
    data = bytearray(archive)
    with zipfile.ZipFile(io.BytesIO(archive)) as handle:
        for info in handle.infolist():
            start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
            data[start : start + info.compress_size] = b"\xff" * info.compress_size
    return bytes(data)


def test_an_initial_pipeline_zip_with_broken_data_is_skipped(
    ec2_zip: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = tmp_path / "broken.zip"
    broken.write_bytes(with_deflate_data_broken(published_zip(EC2)))
    settings = Settings(model_path=tmp_path / "models", initial_pipeline_url=f"{broken}, {ec2_zip}")

    with caplog.at_level(logging.WARNING, logger="serving.initial_pipelines"):
        with running(create_app(settings)) as client:
            reply = client.post("/model", json={**SGD_REQUEST, "machine_spec": M5ZN})

    assert reply.status_code == 200
    assert reply.headers["X-Model-Name"] == "SGDRegressorTrainer_4"
    assert any("broken.zip" in r.getMessage() for r in caplog.records)


def test_a_model_archive_with_broken_data_is_skipped_and_the_rest_served(
    tmp_path: Path,
) -> None:
    models = tmp_path / "models"
    shutil.copytree(EC2, models / EC2.name)
    broken = models / EC2.name / BPF_ABS.relative_to(EC2) / "SGDRegressorTrainer_4.zip"
    broken.write_bytes(with_deflate_data_broken(broken.read_bytes()))
    settings = Settings(model_path=models, default_pipeline="ec2-0.7.11")

    with running(create_app(settings)) as client:
        reply = client.post("/model", json={**SGD_REQUEST, "machine_spec": M5ZN})
        metrics = client.get("/metrics")

    assert reply.status_code == 200
    assert reply.headers["X-Model-Name"] != "SGDRegressorTrainer_4"
    assert metrics.status_code == 200
    provider = ModelProvider(settings)
    provider.close()
