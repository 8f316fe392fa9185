"""POST /train on a real uvicorn server, running the offline-training flow in Prefect."""

from __future__ import annotations

import gzip
import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kepler_model.settings import Settings
from serving.train_api import create_train_app
from tests.conftest import running_server

SGD_ONLY = {"abs_trainers": ["SGDRegressorTrainer"], "dyn_trainers": ["SGDRegressorTrainer"]}


@pytest.fixture(scope="module")
def dump(workload_dump: Path) -> dict[str, Any]:
    with gzip.open(workload_dump) as handle:
        return dict(json.load(handle))


@pytest.fixture(scope="module")
def train_api(tmp_path_factory: pytest.TempPathFactory, prefect_harness: None) -> Iterator[str]:
    settings = Settings(model_path=tmp_path_factory.mktemp("train-api") / "models")
    with running_server(create_train_app(settings)) as url:
        yield url


def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{url}/train", content=body, headers=headers or {}, timeout=180)


def test_gzipped_request_answers_with_the_pipeline_zip(train_api: str, dump: dict) -> None:
    body = {
        "name": "api-pipeline",
        "energy_source": "rapl",
        "trainer": SGD_ONLY,
        "prom_response": dump,
    }
    reply = post(
        train_api,
        gzip.compress(json.dumps(body).encode()),
        {"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )

    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == "application/zip"
    assert reply.headers["x-flow-run-id"]
    with zipfile.ZipFile(io.BytesIO(reply.content)) as archive:
        names = set(archive.namelist())
        metadata = json.loads(archive.read("metadata.json"))
    assert metadata["name"] == "api-pipeline"
    assert "rapl-sysfs/AbsPower/CounterOnly/SGDRegressorTrainer_0.json" in names
    assert "rapl-sysfs/DynPower/CounterIRQCombined/SGDRegressorTrainer_0.zip" in names
    assert "rapl-sysfs_AbsPower_model_metadata.csv" in names


def test_seed_spelling_prome_response_is_accepted(train_api: str, dump: dict) -> None:
    body = {"name": "seed-spelling", "trainer": SGD_ONLY, "prome_response": dump}
    reply = post(train_api, json.dumps(body).encode())
    assert reply.status_code == 200, reply.text


BAD_REQUESTS = [
    ("invalid JSON", b"{not json", {}, 400, "not valid JSON"),
    (
        "truncated gzip",
        gzip.compress(b'{"name": "x"}')[:-6],
        {"Content-Encoding": "gzip"},
        400,
        "gzip",
    ),
    ("missing dump", json.dumps({"name": "x"}).encode(), {}, 422, "prom_response"),
    (
        "unknown trainer",
        json.dumps(
            {
                "name": "x",
                "trainer": {"abs_trainers": ["NoSuchTrainer"]},
                "prom_response": {"m": []},
            }
        ).encode(),
        {},
        422,
        "NoSuchTrainer",
    ),
    (
        "unknown isolator",
        json.dumps(
            {"name": "x", "trainer": {"isolator": "Nope"}, "prom_response": {"m": []}}
        ).encode(),
        {},
        422,
        "Nope",
    ),
    (
        "path in pipeline name",
        json.dumps({"name": "../escape", "prom_response": {"m": []}}).encode(),
        {},
        422,
        "name",
    ),
    (
        "malformed dump",
        json.dumps({"name": "x", "prom_response": {"kepler_node_info": [{"values": 3}]}}).encode(),
        {},
        400,
        "prom_response",
    ),
]


@pytest.mark.parametrize(
    ("case", "body", "headers", "status", "words"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_requests_get_a_clear_error_and_the_api_keeps_serving(
    train_api: str, case: str, body: bytes, headers: dict, status: int, words: str
) -> None:
    reply = post(train_api, body, headers)
    assert reply.status_code == status, reply.text
    assert words in reply.json()["error"]
    assert httpx.get(f"{train_api}/healthz").status_code == 200
