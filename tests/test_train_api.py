"""POST /train on a real uvicorn server, running the offline-training flow in Prefect."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import time
import tracemalloc
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from kepler_model.settings import Settings
from serving.train_api import create_train_app
from serving.train_request import TrainRequestError, parse_train_request, prepare_training
from tests.conftest import free_port, running_server

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


def request_body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


DUMP: dict[str, Any] = {"kepler_node_info": []}

BAD_REQUESTS = [
    ("invalid JSON", b"{not json", {}, 400, "not valid JSON"),
    ("empty body", b"", {}, 400, "not valid JSON"),
    ("not UTF-8", b'{"name": "\xff"}', {}, 400, "not UTF-8"),
    ("trailing garbage", request_body(name="x", prom_response=DUMP) + b"]", {}, 400, "Extra"),
    ("deeply nested", b'{"name": ' + b"[" * 100_000, {}, 400, "not valid JSON"),
    ("body not an object", b"[1, 2]", {}, 422, "valid dictionary"),
    ("integer of 5000 digits", b'{"name": "x", "n": ' + b"1" * 5000 + b"}", {}, 400, "JSON"),
    ("gzip not gzip", b"plain", {"Content-Encoding": "gzip"}, 400, "not valid gzip"),
    (
        "data after the gzip stream",
        gzip.compress(request_body(name="x", prom_response=DUMP)) + b"junk",
        {"Content-Encoding": "gzip"},
        400,
        "after the end of its gzip stream",
    ),
    ("empty dump", request_body(name="x", prom_response={}), {}, 422, "holds no metrics"),
    ("dump a list", request_body(name="x", prom_response=[1]), {}, 422, "metric name ->"),
    (
        "idle dump not an object",
        request_body(name="x", prom_response=DUMP, trainer={"idle_prom_response": 3}),
        {},
        422,
        "trainer.idle_prom_response",
    ),
    ("unknown field", request_body(name="x", prom_response=DUMP, colour=1), {}, 422, "colour"),
    ("name not a string", request_body(name=7, prom_response=DUMP), {}, 422, "name"),
    (
        "node_type text",
        request_body(name="x", prom_response=DUMP, node_type="one"),
        {},
        422,
        "node_type",
    ),
    (
        "unknown source",
        request_body(name="x", prom_response=DUMP, energy_source="solar"),
        {},
        422,
        "unknown energy source",
    ),
    (
        "trainers not a list",
        request_body(name="x", prom_response=DUMP, trainer={"abs_trainers": "SGD"}),
        {},
        422,
        "abs_trainers",
    ),
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
        "no trainer at all",
        request_body(
            name="x", prom_response=DUMP, trainer={"abs_trainers": [], "dyn_trainers": []}
        ),
        {},
        422,
        "nothing to train",
    ),
    (
        "an encoding other than gzip",
        request_body(name="x", prom_response=DUMP),
        {"Content-Encoding": "br"},
        415,
        "'br'",
    ),
    (
        "dump of series without samples",
        request_body(name="x", prom_response={"kepler_node_info": []}),
        {},
        400,
        "prom_response: the dump holds no samples",
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


@pytest.fixture(scope="module")
def small_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A train API that takes bodies of at most 1 MB (after decompression); never trains."""
    path = tmp_path_factory.mktemp("small-api") / "models"
    settings = Settings(model_path=path, train_max_body_bytes=1_000_000)
    with running_server(create_train_app(settings)) as url:
        yield url


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (b" " * 1_100_000, {}),
        (gzip.compress(b" " * 50_000_000, compresslevel=1), {"Content-Encoding": "gzip"}),
    ],
    ids=["plain", "gzip bomb"],
)
def test_bodies_over_the_limit_are_refused_without_being_inflated(
    small_api: str, body: bytes, headers: dict[str, str]
) -> None:
    reply = post(small_api, body, headers)

    assert reply.status_code == 413
    assert "larger than 1000000 bytes" in reply.json()["error"]
    assert httpx.get(f"{small_api}/healthz").json() == {"status": "ok", "training": []}


def test_reading_a_body_keeps_its_dumps_as_text_spans(dump: dict[str, Any]) -> None:
    idle = {"kepler_node_info": dump["kepler_node_info"]}
    body = {"name": "x", "prome_response": dump, "trainer": {"idle_prom_response": idle}}
    text = json.dumps(body, indent=1)

    request = parse_train_request(text)

    span = request.prom_response
    assert json.loads(text[span.start : span.end]) == dump
    assert span.metrics == len(dump)
    idle_span = request.trainer.idle_prom_response
    assert idle_span is not None and json.loads(text[idle_span.start : idle_span.end]) == idle


def test_preparing_a_large_body_never_holds_the_dump_as_objects(
    dump: dict[str, Any], tmp_path: Path
) -> None:
    """json.loads of a dump costs about 7 times its size; reading it as text costs 2 times
    (the file's bytes, then its text), plus one series at a time."""
    body = tmp_path / "body.json"
    replicas = {f"{metric}_{k}": series for metric, series in dump.items() for k in range(2)}
    body.write_text(json.dumps({"name": "large", "prom_response": replicas}))
    size = body.stat().st_size

    tracemalloc.start()
    try:
        job = prepare_training(body, tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < 2.2 * size, f"peak {peak} bytes for a {size} byte body"
    assert job.workload.stat().st_size > 0.99 * size
    with job.workload.open() as handle:
        assert len(json.load(handle)) == len(replicas)


def test_a_syntax_error_inside_a_dump_names_its_position() -> None:
    text = '{"name": "x", "prom_response": {"m": [{"values": [[1, "2"]}]}}'

    with pytest.raises(TrainRequestError, match="line 1 column"):
        parse_train_request(text)


def wait_until_training(url: str, names: set[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not names <= set(httpx.get(f"{url}/healthz").json()["training"]):
        assert time.monotonic() < deadline, f"{names} not training within {timeout} s"
        time.sleep(0.05)


def test_two_pipelines_train_side_by_side_and_a_repeat_is_refused(
    train_api: str, dump: dict
) -> None:
    names = ("side-a", "side-b")
    bodies = {n: request_body(name=n, trainer=SGD_ONLY, prom_response=dump) for n in names}

    with ThreadPoolExecutor(len(names)) as pool:
        running = {n: pool.submit(post, train_api, body) for n, body in bodies.items()}
        wait_until_training(train_api, set(names))
        refused = post(train_api, bodies["side-a"])
        replies = {n: future.result() for n, future in running.items()}

    assert refused.status_code == 409
    assert "side-a is already being trained" in refused.json()["error"]
    for name, reply in replies.items():
        assert reply.status_code == 200, reply.text
        with zipfile.ZipFile(io.BytesIO(reply.content)) as archive:
            assert json.loads(archive.read("metadata.json"))["name"] == name
    assert replies["side-a"].headers["x-flow-run-id"] != replies["side-b"].headers["x-flow-run-id"]


def wait_until_healthy(url: str, process: subprocess.Popen[bytes], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, "the train API exited early"
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.3)
    raise AssertionError(f"{url} not healthy after {seconds} s")


def test_stopping_the_train_api_stops_the_prefect_server_it_started(
    tmp_path: Path, dump: dict[str, Any]
) -> None:
    """``kepler-model train-api`` without PREFECT_API_URL starts Prefect's temporary API server
    at its first flow run; SIGTERM (uvicorn re-raises it after shutting down) must stop both."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    command = [sys.executable, "-m", "kepler_model", "train-api", "--port", str(port)]
    command += ["--model-path", str(tmp_path / "models")]
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process)
        trainers = {"abs_trainers": ["SGDRegressorTrainer"], "dyn_trainers": []}
        body = {"name": "stop", "trainer": trainers, "prom_response": dump}
        assert post(url, json.dumps(body).encode()).status_code == 200
        children = psutil.Process(process.pid).children(recursive=True)
    finally:
        process.terminate()
        _, errors = process.communicate(timeout=60)
    assert children, "expected the temporary Prefect API server as a child process"
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, errors.decode()[-2000:]
