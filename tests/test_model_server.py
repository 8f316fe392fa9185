"""The model server, spoken to over HTTP as Kepler and operators speak to it.

Every test talks to a real uvicorn server on a free loopback port (conftest's running_server).
"""

from __future__ import annotations

import io
import json
import logging
import socket
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from kepler_model.settings import Settings
from modelling.power_model import PowerModel
from modelling.trainers import make_trainer
from modelling.training import TrainingSet, train_model
from modelling.vocabulary import FEATURE_GROUPS
from serving.initial_pipelines import load_initial_pipelines
from serving.model_server import create_app
from storage.catalogue import LiveCatalogue
from storage.pipelines import PublishedModel, publish, rollback, zip_pipeline
from tests.conftest import running_server

OLD_DB = Path(__file__).parent / "data" / "model-db"
OLD_BPF = OLD_DB / "ec2-0.7.11" / "rapl-sysfs" / "AbsPower" / "BPFOnly"
BPF_METRICS = ["bpf_cpu_time_ms", "bpf_page_cache_hit"]
PIPELINE = "kepler-default"
NODE_TYPES: dict[str, dict[str, Any]] = {
    "0": {
        "attrs": {
            "processor": "intel_xeon_test",
            "cores": 8,
            "chips": 1,
            "memory": 32,
            "frequency": 3000,
        },
        "members": ["test-machine"],
    }
}

# What Kepler's Go client sends, field for field.
GO_REQUEST: dict[str, Any] = {
    "metrics": BPF_METRICS,
    "output_type": "AbsPower",
    "source": "rapl-sysfs",
    "node_type": 1,
    "weight": True,
    "trainer_name": "SGDRegressorTrainer",
    "filter": "",
}


@contextmanager
def running(app: Starlette) -> Iterator[httpx.Client]:
    """A real uvicorn server for ``app`` on loopback, and a client bound to it."""
    with running_server(app) as url, httpx.Client(base_url=url, timeout=20) as client:
        yield client


def bpf_model(
    trainer: str, node_type: int, bias: float = 100.0, noise_watts: float = 0.5
) -> PowerModel:
    """A small real model fitted on synthetic BPFOnly rows: package and dram follow CPU time."""
    rng = np.random.default_rng(node_type)
    x = np.column_stack([rng.uniform(0, 50_000, 300), rng.uniform(0, 100, 300)])
    noise = rng.normal(0, noise_watts, 300)
    y = {
        "package": bias + 0.003 * x[:, 0] + noise,
        "core": np.zeros(300),
        "uncore": np.zeros(300),
        "dram": 10 + 0.0002 * x[:, 0] + noise / 10,
    }
    data = TrainingSet(
        x=x,
        y=y,
        features=FEATURE_GROUPS["BPFOnly"],
        feature_group="BPFOnly",
        output_type="AbsPower",
        node_type=node_type,
        machine_spec=NODE_TYPES[str(node_type)]["attrs"] if str(node_type) in NODE_TYPES else None,
    )
    return train_model(make_trainer(trainer), data)


def publish_bpf(model_path: Path, name: str, *models: PowerModel) -> Path:
    published = [
        PublishedModel("rapl-sysfs", m.metadata["output_type"], "BPFOnly", m) for m in models
    ]
    metadata = {
        "isolator": "min",
        "extractor": "default",
        "abs_trainers": sorted({m.metadata["trainer"] for m in models}),
        "dyn_trainers": [],
    }
    return publish(model_path, name, published, metadata, NODE_TYPES)


def model_file(model_path: Path, name: str, suffix: str) -> Path:
    return model_path / PIPELINE / "rapl-sysfs" / "AbsPower" / "BPFOnly" / f"{name}{suffix}"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One pipeline, node type 0 only: an SGD model (weights) and a gradient boosting one."""
    path = tmp_path_factory.mktemp("models")
    publish_bpf(
        path,
        PIPELINE,
        bpf_model("SGDRegressorTrainer", 0),
        bpf_model("GradientBoostingRegressorTrainer", 0),
    )
    return path


@pytest.fixture(scope="module")
def client(model_path: Path) -> Iterator[httpx.Client]:
    with running(create_app(Settings(model_path=model_path, initial_pipeline_url=""))) as client:
        yield client


@pytest.fixture(scope="module")
def old_db() -> Iterator[httpx.Client]:
    settings = Settings(model_path=OLD_DB, initial_pipeline_url="", default_pipeline="ec2-0.7.11")
    with running(create_app(settings)) as client:
        yield client


def test_go_client_request_gets_the_published_weight_json(
    client: httpx.Client, model_path: Path
) -> None:
    reply = client.post("/model", json=GO_REQUEST)

    assert reply.status_code == 200
    assert reply.headers["content-type"] == "application/json"
    body = reply.json()
    published = json.loads(model_file(model_path, "SGDRegressorTrainer_0", ".json").read_text())
    assert {c: body[c] for c in published} == published
    assert body["model_name"] == "SGDRegressorTrainer_0"
    assert body["machine_spec"] == NODE_TYPES["0"]["attrs"]
    assert body["mae"] >= 0


def test_weight_false_returns_the_archive_bytes_unchanged(
    client: httpx.Client, model_path: Path
) -> None:
    reply = client.post("/model", json={**GO_REQUEST, "weight": False, "trainer_name": ""})

    assert reply.status_code == 200
    assert reply.headers["content-type"] == "application/zip"
    name = reply.headers["x-model-name"]
    assert reply.headers["content-disposition"] == f'attachment; filename="{name}.zip"'
    assert reply.content == model_file(model_path, name, ".zip").read_bytes()


def test_missing_node_type_falls_back_to_another_and_says_so(client: httpx.Client) -> None:
    reply = client.post("/model", json=GO_REQUEST)

    assert reply.status_code == 200
    assert reply.headers["x-node-type"] == "0"
    assert reply.headers["x-node-type-matched"] == "false"
    assert reply.headers["x-pipeline"] == PIPELINE
    assert reply.headers["x-feature-group"] == "BPFOnly"


def test_requested_node_type_is_preferred(client: httpx.Client) -> None:
    reply = client.post("/model", json={**GO_REQUEST, "node_type": 0})

    assert reply.headers["x-node-type"] == "0"
    assert reply.headers["x-node-type-matched"] == "true"


def test_node_type_may_be_written_as_a_whole_float(client: httpx.Client) -> None:
    reply = client.post("/model", json={**GO_REQUEST, "node_type": 0.0})

    assert reply.headers["x-node-type-matched"] == "true"


def test_strict_node_type_without_a_model_is_404(client: httpx.Client) -> None:
    reply = client.post("/model", json={**GO_REQUEST, "loose_node_type": False})

    assert reply.status_code == 404
    assert reply.json()["searched"]["node_type"] == 1


def test_defaults_serve_the_best_archive(client: httpx.Client) -> None:
    reply = client.post("/model", json={"metrics": BPF_METRICS, "output_type": "AbsPower"})

    assert reply.status_code == 200
    assert reply.headers["content-type"] == "application/zip"
    assert reply.headers["x-source"] == "rapl-sysfs"


def test_a_source_naming_rapl_means_rapl_sysfs(client: httpx.Client) -> None:
    reply = client.post("/model", json={**GO_REQUEST, "source": "intel_rapl"})

    assert reply.status_code == 200
    assert reply.headers["x-source"] == "rapl-sysfs"


def test_no_model_reply_says_what_was_searched_and_what_exists(client: httpx.Client) -> None:
    reply = client.post("/model", json={**GO_REQUEST, "metrics": ["cpu_cycles"]})

    assert reply.status_code == 404
    body = reply.json()
    assert "no published model" in body["error"]
    assert body["searched"]["feature_groups"] == []
    assert body["searched"]["source"] == "rapl-sysfs"
    assert f"{PIPELINE}/rapl-sysfs/AbsPower/BPFOnly/SGDRegressorTrainer_0" in body["available"]


BAD_REQUESTS = [
    ("invalid JSON", b'{"metrics": [', 400, "not valid JSON"),
    ("not UTF-8", b'{"metrics": ["\xff"]}', 400, "not valid JSON"),
    ("deeply nested", b"[" * 100_000, 400, "not valid JSON"),
    ("body not an object", b"[1, 2]", 422, "valid dictionary"),
    ("metrics a string", {**GO_REQUEST, "metrics": "bpf_cpu_time_ms"}, 422, "metrics"),
    ("metrics missing", {"output_type": "AbsPower"}, 422, "metrics: Field required"),
    ("empty metrics", {**GO_REQUEST, "metrics": []}, 422, "metrics"),
    ("metric not a string", {**GO_REQUEST, "metrics": [1, 2]}, 422, "metrics.0"),
    ("weight yes", {**GO_REQUEST, "weight": "yes"}, 422, "weight"),
    ("weight 1", {**GO_REQUEST, "weight": 1}, 422, "weight"),
    ("node_type text", {**GO_REQUEST, "node_type": "1"}, 422, "node_type"),
    ("node_type below -1", {**GO_REQUEST, "node_type": -2}, 422, "node_type"),
    ("node_type fractional", {**GO_REQUEST, "node_type": 1.5}, 422, "node_type"),
    ("unknown output_type", {**GO_REQUEST, "output_type": "Watts"}, 422, "output_type"),
    ("output_type missing", {"metrics": BPF_METRICS}, 422, "output_type"),
    ("unknown source", {**GO_REQUEST, "source": "solar"}, 400, "unknown energy source 'solar'"),
    ("filter not key:value", {**GO_REQUEST, "filter": "mae"}, 400, "filter"),
    ("filter bound not a number", {**GO_REQUEST, "filter": "mae:low"}, 400, "needs a number"),
    ("machine_spec not an object", {**GO_REQUEST, "machine_spec": 3}, 422, "machine_spec"),
    ("no model covers metrics", {**GO_REQUEST, "metrics": ["cpu_cycles"]}, 404, "no published"),
    ("huge body", b" " * (5 * 1024 * 1024), 413, "exceeds the"),
    ("empty body", b"", 400, "not valid JSON"),
    ("null body", b"null", 422, "valid dictionary"),
    ("trailing garbage", json.dumps(GO_REQUEST).encode() + b"}", 400, "Extra data"),
    (
        "NaN node_type",
        b'{"metrics": ["a"], "output_type": "AbsPower", "node_type": NaN}',
        422,
        "node_type",
    ),
    ("huge metrics array", {**GO_REQUEST, "metrics": ["m"] * 100_000}, 422, "at most 1024"),
    ("huge number", {**GO_REQUEST, "node_type": 10**400}, 422, "node_type"),
    (
        "integer of 5000 digits",
        b'{"metrics": ["a"], "output_type": "AbsPower", "node_type": ' + b"1" * 5000 + b"}",
        400,
        "not valid JSON",
    ),
    ("filter bound NaN", {**GO_REQUEST, "filter": "mae:nan"}, 400, "finite number"),
    ("filter key unknown", {**GO_REQUEST, "filter": "colour:3"}, 400, "unknown filter key"),
    ("filter component unknown", {**GO_REQUEST, "filter": "gpu_mae:3"}, 400, "'gpu_mae'"),
    (
        "unknown field instead of metrics",
        {"metric": BPF_METRICS, "output_type": "AbsPower"},
        422,
        "unknown fields ignored: metric",
    ),
    (
        "machine_spec negative cores",
        {**GO_REQUEST, "machine_spec": {"cores": -4}},
        422,
        "machine_spec.cores",
    ),
    ("unknown pipeline_name", {**GO_REQUEST, "pipeline_name": "nope"}, 404, "no published"),
    (
        "trainer without weights",
        {**GO_REQUEST, "trainer_name": "GradientBoostingRegressorTrainer"},
        422,
        "GradientBoostingRegressorTrainer publishes no weight JSON",
    ),
    ("filter excludes every model", {**GO_REQUEST, "filter": "mae:0"}, 404, "no published"),
]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_request_gets_a_clear_4xx_and_the_server_stays_up(
    client: httpx.Client, body: bytes | dict[str, Any], status: int, message: str
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()

    reply = client.post("/model", content=content, headers={"content-type": "application/json"})

    assert reply.status_code == status
    assert message in reply.json()["error"]
    assert client.get("/healthz").status_code == 200


def test_a_client_leaving_mid_body_is_logged_as_such_not_as_a_server_error(
    client: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    host, port = client.base_url.host, client.base_url.port
    head = f"POST /model HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    caplog.set_level(logging.INFO)
    with socket.create_connection((host, port)) as raw:
        raw.sendall(f"{head}Content-Length: 100\r\n\r\n".encode() + b'{"a": 1}')
        raw.shutdown(socket.SHUT_WR)
        raw.recv(1024)
    deadline = time.monotonic() + 5
    while "left before sending" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)

    assert "the client left before sending its whole body" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert client.get("/healthz").status_code == 200


def test_best_models_names_the_best_model_per_output_type_and_group(
    client: httpx.Client,
) -> None:
    reply = client.get("/best-models", params={"energy-source": "rapl-sysfs", "node-type": 0})

    assert reply.status_code == 200
    best = reply.json()
    assert set(best) == {"AbsPower", "DynPower"}
    assert best["DynPower"] == {}
    assert best["AbsPower"]["BPFOnly"] in {
        "SGDRegressorTrainer_0",
        "GradientBoostingRegressorTrainer_0",
    }


def test_best_models_filter_and_output_type_narrow_the_answer(client: httpx.Client) -> None:
    reply = client.get("/best-models", params={"output-type": "AbsPower", "filter": "mae:0"})

    assert reply.json() == {"AbsPower": {}}


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"node-type": "x"}, 422),
        ({"node-type": "99999999999999999999"}, 422),
        ({"output-type": "Watts"}, 422),
        ({"feature-group": "Nope"}, 422),
        ({"energy-source": "x"}, 400),
    ],
)
def test_best_models_refuses_bad_parameters(
    client: httpx.Client, params: dict[str, str], status: int
) -> None:
    reply = client.get("/best-models", params=params)

    assert reply.status_code == status
    assert reply.json()["error"]


def test_healthz_and_readyz_answer_when_models_are_loaded(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["models"] == 2


def test_readyz_is_503_without_any_pipeline(tmp_path: Path) -> None:
    with running(create_app(Settings(model_path=tmp_path, initial_pipeline_url=""))) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["status"] == "not ready"
        assert client.post("/model", json=GO_REQUEST).status_code == 404


def test_pipelines_lists_metadata_and_model_counts(client: httpx.Client) -> None:
    (pipeline,) = client.get("/pipelines").json()["pipelines"]

    assert pipeline["name"] == PIPELINE
    assert pipeline["metadata"]["isolator"] == "min"
    assert pipeline["models"] == {"rapl-sysfs": {"AbsPower": 2}}
    assert pipeline["node_types"] == NODE_TYPES


def test_metrics_count_requests_by_route_and_status(client: httpx.Client) -> None:
    client.post("/model", json=GO_REQUEST)
    client.post("/model", json={**GO_REQUEST, "weight": "yes"})

    text = client.get("/metrics").text

    ok = 'kepler_model_server_requests_total{method="POST",route="/model",status="200"}'
    refused = 'kepler_model_server_requests_total{method="POST",route="/model",status="422"}'
    assert ok in text and refused in text
    assert "kepler_model_server_request_duration_seconds_bucket" in text
    assert "kepler_model_server_pipelines_loaded 1.0" in text
    models = 'models_loaded{output_type="AbsPower",pipeline="kepler-default",source="rapl-sysfs"}'
    assert f"kepler_model_server_{models} 2.0" in text


def test_a_new_publish_is_served_without_restart(tmp_path: Path) -> None:
    publish_bpf(tmp_path, PIPELINE, bpf_model("SGDRegressorTrainer", 0, bias=100.0))
    request = {**GO_REQUEST, "node_type": 0}
    with running(create_app(Settings(model_path=tmp_path, initial_pipeline_url=""))) as client:
        before = client.post("/model", json=request).json()["package"]

        publish_bpf(tmp_path, PIPELINE, bpf_model("SGDRegressorTrainer", 0, bias=200.0))
        weights = json.loads(model_file(tmp_path, "SGDRegressorTrainer_0", ".json").read_text())
        deadline = time.monotonic() + 10
        while (served := client.post("/model", json=request).json())["package"] == before:
            assert time.monotonic() < deadline, "new publish not served within 10 s"
            time.sleep(0.1)

    assert served["package"] == weights["package"]


def test_old_model_db_weights_are_served_as_published(old_db: httpx.Client) -> None:
    request = {**GO_REQUEST, "node_type": 0}

    reply = old_db.post("/model", json=request)

    assert reply.status_code == 200
    body = reply.json()
    published = json.loads((OLD_BPF / "SGDRegressorTrainer_0.json").read_text())
    assert {c: body[c] for c in published} == published
    assert body["mae"] == 60.78
    assert body["machine_spec"]["processor"] == "intel_xeon_platinum_8259cl"
    package = body["package"]["All_Weights"]
    cpu = package["Numerical_Variables"]["bpf_cpu_time_ms"]
    watts = package["Bias_Weight"] + cpu["weight"] * 10_000 / cpu["scale"]
    assert watts == pytest.approx(175.64, abs=0.01)  # SPEC section 5's check


def test_old_model_db_go_request_gets_its_own_node_type(old_db: httpx.Client) -> None:
    reply = old_db.post("/model", json=GO_REQUEST)

    assert reply.headers["x-model-name"] == "SGDRegressorTrainer_1"
    assert reply.headers["x-node-type-matched"] == "true"


@pytest.mark.parametrize("name", ["SGDRegressorTrainer_0", "GradientBoostingRegressorTrainer_1"])
def test_old_model_db_archives_are_served_byte_for_byte(old_db: httpx.Client, name: str) -> None:
    trainer, node_type = name.rsplit("_", 1)
    request = {**GO_REQUEST, "weight": False, "trainer_name": trainer, "node_type": int(node_type)}

    reply = old_db.post("/model", json=request)

    assert reply.status_code == 200
    assert reply.headers["x-model-name"] == name
    assert reply.content == (OLD_BPF / f"{name}.zip").read_bytes()


def zip_of(files: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def served_pipelines(client: httpx.Client) -> set[str]:
    return {p["name"] for p in client.get("/pipelines").json()["pipelines"]}


def test_failing_initial_pipeline_urls_are_skipped_and_the_others_served(
    tmp_path: Path,
) -> None:
    published = publish_bpf(tmp_path / "a", "from-file-url", bpf_model("SGDRegressorTrainer", 0))
    local_zip = tmp_path / "from-file-url.zip"
    local_zip.write_bytes(zip_pipeline(published))
    http_pipeline = publish_bpf(tmp_path / "b", "from-http", bpf_model("SGDRegressorTrainer", 2))
    evil = zip_of({"metadata.json": b'{"name": "evil"}', "../escape.json": b"{}"})
    not_zip = tmp_path / "not-a.zip"
    not_zip.write_text("hello")
    files = {"/pipeline.zip": zip_pipeline(http_pipeline), "/evil.zip": evil}

    async def serve_file(request: Request) -> Response:
        data = files.get(request.url.path)
        return Response(data, media_type="application/zip") if data else Response(b"", 404)

    web = Starlette(routes=[Route("/{name}", serve_file)])
    with running(web) as web_client:
        base = str(web_client.base_url)
        urls = [
            f"{base}/missing.zip",
            local_zip.as_uri(),
            f"{base}/evil.zip",
            "file:///nonexistent/pipeline.zip",
            f"{base}/pipeline.zip",
            "ftp://example.invalid/pipeline.zip",
            str(not_zip),
            str(OLD_DB / "ec2-0.7.11"),
            "http://127.0.0.1:9/refused.zip",
        ]
        settings = Settings(model_path=tmp_path / "empty", initial_pipeline_url=",".join(urls))
        with running(create_app(settings)) as client:
            names = served_pipelines(client)
            reply = client.post("/model", json={**GO_REQUEST, "node_type": 2})

    assert names == {"from-file-url", "from-http", "ec2-0.7.11"}
    assert reply.headers["x-pipeline"] == "from-http"
    assert not (tmp_path / "escape.json").exists()


def test_given_catalogue_is_served_as_is(model_path: Path, tmp_path: Path) -> None:
    catalogue = LiveCatalogue([model_path, OLD_DB], PIPELINE)
    settings = Settings(model_path=tmp_path, initial_pipeline_url="")

    with running(create_app(settings, catalogue)) as client:
        names = served_pipelines(client)

    assert names == {PIPELINE, "ec2-0.7.11"}


def test_unknown_fields_are_ignored_and_named_in_a_header(client: httpx.Client) -> None:
    reply = client.post("/model", json={**GO_REQUEST, "model_name": "", "spec": {"cores": 8}})

    assert reply.status_code == 200
    assert reply.headers["x-ignored-fields"] == "model_name, spec"


def test_weight_requests_get_weight_capable_trainers_only(old_db: httpx.Client) -> None:
    archive = old_db.post("/model", json={**GO_REQUEST, "weight": False, "trainer_name": ""})
    weights = old_db.post("/model", json={**GO_REQUEST, "trainer_name": ""})

    assert archive.headers["x-model-name"] == "GradientBoostingRegressorTrainer_1"  # MAE 3.12
    assert weights.headers["x-model-name"] == "SGDRegressorTrainer_1"  # MAE 18.35


@pytest.mark.parametrize(
    ("filter_text", "status"),
    [
        ("mae:1000", 200),
        ("mae:0", 404),
        ("mape:1000;mae:1000", 200),
        ("mape:0", 404),
        ("package_mae:1000", 200),
        ("dram_mae:0", 404),
        ("features:bpf_cpu_time_ms,bpf_page_cache_hit,cpu_cycles", 200),
        ("features:bpf_cpu_time_ms", 404),
    ],
)
def test_filters_bound_errors_and_features(
    client: httpx.Client, filter_text: str, status: int
) -> None:
    reply = client.post("/model", json={**GO_REQUEST, "filter": filter_text})

    assert reply.status_code == status
    if status == 404:
        assert reply.json()["searched"]["filter"] == filter_text


@pytest.fixture(scope="module")
def two_pipelines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """The default pipeline (bias 100) and another one (bias 300, ten times more accurate),
    both SGD on node type 0."""
    path = tmp_path_factory.mktemp("two-pipelines")
    publish_bpf(path, PIPELINE, bpf_model("SGDRegressorTrainer", 0, bias=100.0, noise_watts=5))
    publish_bpf(path, "other", bpf_model("SGDRegressorTrainer", 0, bias=300.0))
    settings = Settings(model_path=path, initial_pipeline_url="", default_pipeline=PIPELINE)
    with running(create_app(settings)) as client:
        yield client


@pytest.mark.parametrize(("asked", "served"), [("", PIPELINE), ("other", "other")])
def test_pipeline_name_is_honoured(two_pipelines: httpx.Client, asked: str, served: str) -> None:
    reply = two_pipelines.post("/model", json={**GO_REQUEST, "pipeline_name": asked})

    assert reply.status_code == 200
    assert reply.headers["x-pipeline"] == served


def test_the_default_pipeline_wins_over_a_more_accurate_other_one(tmp_path: Path) -> None:
    publish_bpf(tmp_path, PIPELINE, bpf_model("SGDRegressorTrainer", 0, noise_watts=5))
    publish_bpf(tmp_path, "other", bpf_model("GradientBoostingRegressorTrainer", 0))
    settings = Settings(model_path=tmp_path, initial_pipeline_url="", default_pipeline=PIPELINE)
    model = "/models/{}/rapl-sysfs/AbsPower/BPFOnly/{}"

    with running(create_app(settings)) as client:
        best = client.get("/best-models", params={"energy-source": "rapl-sysfs"}).json()
        archive = client.post("/model", json={**GO_REQUEST, "weight": False, "trainer_name": ""})
        ours = client.get(model.format(PIPELINE, "SGDRegressorTrainer_0")).json()
        other = client.get(model.format("other", "GradientBoostingRegressorTrainer_0")).json()

    assert other["metadata"]["mae"] < ours["metadata"]["mae"]
    assert best["AbsPower"]["BPFOnly"] == "SGDRegressorTrainer_0"
    assert archive.headers["x-pipeline"] == PIPELINE


def test_no_model_reply_lists_the_pipelines_loaded(two_pipelines: httpx.Client) -> None:
    reply = two_pipelines.post("/model", json={**GO_REQUEST, "pipeline_name": "nope"})

    assert reply.status_code == 404
    assert reply.json()["searched"]["pipeline"] == "nope"
    assert reply.json()["pipelines"] == [PIPELINE, "other"]


def curve_model(node_type: int = 0) -> PowerModel:
    """A logarithmic model whose only varying component (package) is fitted on CPU time."""
    rng = np.random.default_rng(7)
    x = np.column_stack([rng.uniform(1, 50_000, 300), rng.uniform(0, 100, 300)])
    zero = np.zeros(300)
    y = {"package": 20 + 30 * np.log1p(x[:, 0] / 5_000), "core": zero, "dram": zero}
    data = TrainingSet(x, y, FEATURE_GROUPS["BPFOnly"], "BPFOnly", "AbsPower", node_type)
    return train_model(make_trainer("LogarithmicRegressionTrainer"), data)


@pytest.fixture(scope="module")
def curve_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    path = tmp_path_factory.mktemp("curve")
    publish_bpf(path, PIPELINE, curve_model())
    with running(create_app(Settings(model_path=path, initial_pipeline_url=""))) as client:
        yield client


@pytest.mark.parametrize(
    ("metrics", "status"),
    [(BPF_METRICS, 200), (list(reversed(BPF_METRICS)), 404)],
    ids=["curve feature first", "curve feature second"],
)
def test_curve_weights_are_served_only_when_kepler_feeds_the_curve_its_feature(
    curve_server: httpx.Client, metrics: list[str], status: int
) -> None:
    request = {**GO_REQUEST, "metrics": metrics, "trainer_name": "LogarithmicRegressionTrainer"}

    reply = curve_server.post("/model", json=request)

    assert reply.status_code == status
    if status == 200:
        assert len(reply.json()["package"]["All_Weights"]["CurveFit_Weights"]) == 3


def test_one_models_metadata_by_its_place(client: httpx.Client, model_path: Path) -> None:
    reply = client.get(f"/models/{PIPELINE}/rapl-sysfs/AbsPower/BPFOnly/SGDRegressorTrainer_0")

    assert reply.status_code == 200
    body = reply.json()
    archive = model_file(model_path, "SGDRegressorTrainer_0", ".zip")
    with zipfile.ZipFile(archive) as handle:
        assert body["metadata"] == json.loads(handle.read("metadata.json"))
    assert body["pipeline_version"] == 1
    assert body["weight_capable"] is True
    assert body["archive_bytes"] == archive.stat().st_size
    assert body["features"] == BPF_METRICS


@pytest.mark.parametrize(
    ("path", "words", "listed"),
    [
        ("nope/rapl-sysfs/AbsPower/BPFOnly/SGDRegressorTrainer_0", "no pipeline", PIPELINE),
        (
            f"{PIPELINE}/rapl-sysfs/DynPower/BPFOnly/SGDRegressorTrainer_0",
            "has no model",
            "rapl-sysfs/AbsPower/BPFOnly/SGDRegressorTrainer_0",
        ),
    ],
)
def test_an_unknown_model_is_404_naming_what_exists(
    client: httpx.Client, path: str, words: str, listed: str
) -> None:
    reply = client.get(f"/models/{path}")

    assert reply.status_code == 404
    assert words in reply.json()["error"]
    assert listed in reply.json()["available"]


def test_pipelines_show_the_served_version_and_those_kept(tmp_path: Path) -> None:
    for bias in (100.0, 200.0):
        publish_bpf(tmp_path, PIPELINE, bpf_model("SGDRegressorTrainer", 0, bias=bias))
    with running(create_app(Settings(model_path=tmp_path, initial_pipeline_url=""))) as client:
        (pipeline,) = client.get("/pipelines").json()["pipelines"]

    assert (pipeline["version"], pipeline["versions"]) == (2, [1, 2])
    assert pipeline["metadata"]["version"] == 2


def test_a_rollback_is_served_without_restart(tmp_path: Path) -> None:
    publish_bpf(tmp_path, PIPELINE, bpf_model("SGDRegressorTrainer", 0, bias=100.0))
    first = json.loads(model_file(tmp_path, "SGDRegressorTrainer_0", ".json").read_text())
    publish_bpf(tmp_path, PIPELINE, bpf_model("SGDRegressorTrainer", 0, bias=200.0))
    request = {**GO_REQUEST, "node_type": 0}
    with running(create_app(Settings(model_path=tmp_path, initial_pipeline_url=""))) as client:
        before = client.post("/model", json=request).json()["package"]

        rollback(tmp_path, PIPELINE)
        deadline = time.monotonic() + 10
        while (served := client.post("/model", json=request).json())["package"] == before:
            assert time.monotonic() < deadline, "rollback not served within 10 s"
            time.sleep(0.1)

    assert served["package"] == first["package"]


def metric_value(text: str, name: str, labels: dict[str, str]) -> float:
    """The value of the sample of ``name`` carrying all of ``labels``."""
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} sample with {labels}")


def test_metrics_expose_the_published_weights(client: httpx.Client, model_path: Path) -> None:
    published = json.loads(model_file(model_path, "SGDRegressorTrainer_0", ".json").read_text())
    package = published["package"]["All_Weights"]
    cpu = package["Numerical_Variables"]["bpf_cpu_time_ms"]
    model = {"pipeline": PIPELINE, "model": "SGDRegressorTrainer_0", "component": "package"}
    name = "kepler_model_server_model_weight"

    text = client.get("/metrics").text

    assert metric_value(text, name, {**model, "kind": "bias"}) == package["Bias_Weight"]
    cpu_labels = {**model, "feature": "bpf_cpu_time_ms"}
    assert metric_value(text, name, {**cpu_labels, "kind": "weight"}) == cpu["weight"]
    assert metric_value(text, name, {**cpu_labels, "kind": "scale"}) == cpu["scale"]
    assert 'model="GradientBoostingRegressorTrainer_0"' not in "\n".join(
        line for line in text.splitlines() if line.startswith(name)
    )


def test_metrics_expose_curve_parameters_with_their_feature(curve_server: httpx.Client) -> None:
    reply = curve_server.post("/model", json={**GO_REQUEST, "trainer_name": ""})
    params = reply.json()["package"]["All_Weights"]["CurveFit_Weights"]
    labels = {"component": "package", "feature": "bpf_cpu_time_ms"}

    text = curve_server.get("/metrics").text

    for index, param in enumerate(params):
        kind = {"kind": f"curve_fit_{index}"}
        value = metric_value(text, "kepler_model_server_model_weight", {**labels, **kind})
        assert value == pytest.approx(param)


def test_metrics_count_every_route_including_model_lookups(client: httpx.Client) -> None:
    client.get(f"/models/{PIPELINE}/rapl-sysfs/AbsPower/BPFOnly/nope")

    text = client.get("/metrics").text

    route = "/models/{pipeline}/{source}/{output_type}/{group}/{name}"
    labels = {"method": "GET", "route": route, "status": "404"}
    assert metric_value(text, "kepler_model_server_requests_total", labels) >= 1


@pytest.mark.parametrize(
    ("members", "words"),
    [
        ({"metadata.json": b"{}", "/etc/evil.json": b"{}"}, "absolute path"),
        ({"metadata.json": b"{}", "a/../../evil.json": b"{}"}, "escapes"),
        ({"metadata.json": b"{}", "big.json": b"0" * 50_000}, "unpacks to more than 4096"),
    ],
    ids=["absolute path", "parent escape", "too large"],
)
def test_downloaded_archives_are_checked_before_unpacking(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, members: dict[str, bytes], words: str
) -> None:
    archive = tmp_path / "pipeline.zip"
    archive.write_bytes(zip_of(members, zipfile.ZIP_DEFLATED))

    with caplog.at_level("WARNING"):
        loaded = load_initial_pipelines(str(archive), tmp_path / "out", max_bytes=4096)

    assert loaded == []
    assert words in caplog.text
    assert list((tmp_path / "out").iterdir()) == []
    assert not (tmp_path / "evil.json").exists()


def test_pickles_in_downloaded_pipelines_are_kept_as_bytes_never_loaded(tmp_path: Path) -> None:
    pickled = OLD_BPF / "GradientBoostingRegressorTrainer_0.zip"
    with zipfile.ZipFile(pickled) as handle:
        assert any(n.endswith(".pkl") for n in handle.namelist())
    source = tmp_path / "pipeline.zip"
    source.write_bytes(zip_pipeline(OLD_DB / "ec2-0.7.11"))

    (folder,) = load_initial_pipelines(str(source), tmp_path / "out")

    copied = folder / "rapl-sysfs" / "AbsPower" / "BPFOnly" / pickled.name
    assert copied.read_bytes() == pickled.read_bytes()


def test_openapi_describes_the_model_request(client: httpx.Client) -> None:
    schema = client.get("/openapi.json").json()

    schemas = schema["components"]["schemas"]
    assert schemas["ModelRequest"]["required"] == ["metrics", "output_type"]
    assert {"ErrorReply", "NoModelReply", "ModelReply", "PipelinesReply"} <= set(schemas)
    assert set(schema["paths"]) >= {
        "/model",
        "/best-models",
        "/pipelines",
        "/models/{pipeline}/{source}/{output_type}/{group}/{name}",
        "/healthz",
        "/readyz",
        "/metrics",
    }


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_generated_requests_never_get_a_server_error(client: httpx.Client, mode: str) -> None:
    """Schemathesis fuzzes every route from /openapi.json; replies must conform, never 5xx."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation.modes import GenerationMode
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_dict(client.get("/openapi.json").json())
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    base_url = str(client.base_url)

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=schema.as_strategy(GenerationMode(mode)))
    def fuzz(case: Any) -> None:
        case.validate_response(case.call(base_url=base_url), checks=checks)

    fuzz()
