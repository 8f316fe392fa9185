"""The estimator over real Unix sockets, with models trained on Kepler's 2023 workload dump."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from estimator import evaluation
from estimator.evaluation import ServingModel, is_quick
from estimator.models import ModelProvider, ModelUnavailableError, model_from_weights
from estimator.protocol import (
    KEPLER_READ_BYTES,
    RequestError,
    RequestFramer,
    compact_watts,
    value_matrix,
)
from estimator.server import EstimatorServer, SocketInUseError
from kepler_model.settings import Settings
from modelling.components import ModelFileError
from modelling.power_model import PowerModel
from modelling.trainers import make_trainer
from modelling.training import TrainingSet, train_model
from serving.model_server import create_app
from storage.catalogue import ModelQuery
from storage.pipelines import PublishedModel, publish
from tests.conftest import running_server

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DUMP = REPO / "kepler_model" / "data" / "kepler_workload_2023.json.gz"
FEATURES = ("cache_miss", "cpu_cycles", "cpu_instructions")  # the CounterOnly group
COMPONENTS = ("package", "core", "uncore", "dram")
PIPELINE = "kepler-default"
MODEL_CORES = 4
SERVER_CPUS = 8


# Rows derived from the dump: container rates, and node rates beside node power.


@dataclass(frozen=True)
class Workload:
    node_x: np.ndarray
    node_y: dict[str, np.ndarray]
    container_x: np.ndarray


def _labels(metric: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in metric.items() if k != "__name__"))


def _rates(series: list[dict[str, Any]]) -> dict[tuple[Any, int], float]:
    """(series labels, time) -> rate; counter resets leave a gap."""
    rates = {}
    for s in series:
        points = sorted((int(t), float(v)) for t, v in s["values"])
        for (t0, v0), (t1, v1) in zip(points, points[1:], strict=False):
            if v1 >= v0:
                rates[(_labels(s["metric"]), t1)] = (v1 - v0) / (t1 - t0)
    return rates


def _node_power(series: list[dict[str, Any]]) -> dict[int, float]:
    """Watts per time: the counter summed over mode and package, differenced."""
    joules: dict[int, float] = {}
    for s in series:
        for t, v in s["values"]:
            joules[int(t)] = joules.get(int(t), 0.0) + float(v)
    times = sorted(joules)
    return {
        t1: (joules[t1] - joules[t0]) / (t1 - t0) for t0, t1 in zip(times, times[1:], strict=False)
    }


def derive_workload() -> Workload:
    with gzip.open(DUMP) as handle:
        dump = json.load(handle)
    rates = [_rates(dump[f"kepler_container_{f}_total"]) for f in FEATURES]
    keys = sorted(set.intersection(*(set(r) for r in rates)))
    containers = np.array([[r[k] for r in rates] for k in keys])

    node_sums: dict[int, np.ndarray] = {}
    for (_, t), row in zip(keys, containers, strict=True):
        node_sums[t] = node_sums.get(t, np.zeros(len(FEATURES))) + row
    power = {c: _node_power(dump[f"kepler_node_{c}_joules_total"]) for c in COMPONENTS}
    times = sorted(set(node_sums) & set(power["package"]))
    node_x = np.array([node_sums[t] for t in times])
    node_y = {c: np.array([power[c][t] for t in times]) for c in COMPONENTS}
    return Workload(node_x, node_y, containers[containers.sum(axis=1) > 0])


def train(workload: Workload, trainer: str, output_type: str) -> PowerModel:
    y = workload.node_y
    if output_type == "DynPower":
        y = {c: v - v.min() for c, v in y.items()}
    data = TrainingSet(
        workload.node_x,
        y,
        FEATURES,
        "CounterOnly",
        output_type,
        node_type=0,
        machine_spec={"processor": "intel_xeon_e5_2667v3", "cores": MODEL_CORES, "chips": 1},
    )
    return train_model(make_trainer(trainer), data)


def publish_models(model_path: Path, models: list[PowerModel]) -> None:
    published = [
        PublishedModel("rapl-sysfs", m.metadata["output_type"], "CounterOnly", m) for m in models
    ]
    metadata = {"isolator": "min", "extractor": "default", "abs_trainers": [], "dyn_trainers": []}
    publish(model_path, PIPELINE, published, metadata, {})


@pytest.fixture(scope="module")
def workload() -> Workload:
    return derive_workload()


@pytest.fixture(scope="module")
def models(workload: Workload) -> dict[tuple[str, str], PowerModel]:
    return {
        (trainer, output_type): train(workload, trainer, output_type)
        for trainer in ("SGDRegressorTrainer", "GradientBoostingRegressorTrainer")
        for output_type in ("AbsPower", "DynPower")
    }


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory, models: dict[Any, PowerModel]) -> Path:
    path = tmp_path_factory.mktemp("models")
    publish_models(path, list(models.values()))
    return path


# A server on its own event loop thread; the tests are blocking clients, as Kepler is.


@contextmanager
def serving(settings: Settings, **options: Any) -> Iterator[EstimatorServer]:
    server = EstimatorServer(settings, cpu_count=SERVER_CPUS, **options)
    started = threading.Event()
    failure: list[BaseException] = []

    async def main() -> None:
        await server.start()
        started.set()
        await server.serve()

    def run() -> None:
        try:
            asyncio.run(main())
        except OSError as exc:
            failure.append(exc)
            started.set()

    thread = threading.Thread(target=run, name="estimator-loop", daemon=True)
    thread.start()
    assert started.wait(20), "estimator did not start"
    if failure:
        raise failure[0]
    try:
        yield server
    finally:
        server.request_stop()
        thread.join(20)


def socket_settings(directory: Path, model_path: Path, **values: Any) -> Settings:
    """Settings for a test estimator; model choice must not depend on the test machine."""
    values.setdefault("estimator_match_machine", False)
    return Settings(estimator_socket=directory / "est.sock", model_path=model_path, **values)


@pytest.fixture(scope="module")
def estimator(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Path]:
    directory = tmp_path_factory.mktemp("sock")
    settings = socket_settings(directory, model_path, estimator_max_request_bytes=256 * 1024)
    with serving(settings) as server:
        yield server.socket_path


def send(
    path: Path,
    body: bytes,
    pieces: int = 1,
    pause: float = 0.0,
    half_close: bool = False,
) -> bytes:
    """Write ``body`` (in ``pieces`` with ``pause`` between), then read until the server closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(15)
        client.connect(str(path))
        cuts = np.linspace(0, len(body), pieces + 1).astype(int)
        for start, end in zip(cuts, cuts[1:], strict=False):
            client.sendall(body[start:end])
            time.sleep(pause)
        if half_close:
            client.shutdown(socket.SHUT_WR)
        return read_all(client)


def read_all(client: socket.socket) -> bytes:
    chunks = []
    while chunk := client.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def ask(path: Path, request: dict[str, Any] | bytes, **options: Any) -> dict[str, Any]:
    body = request if isinstance(request, bytes) else json.dumps(request).encode()
    reply = json.loads(send(path, body, **options))
    assert set(reply) == {"powers", "msg", "core_ratio"}
    assert isinstance(reply["powers"], dict)
    return reply


def request(
    rows: np.ndarray | list[list[float]], metrics: tuple[str, ...] = FEATURES, **fields: Any
) -> dict[str, Any]:
    body = {
        "metrics": list(metrics),
        "values": np.asarray(rows).tolist(),
        "output_type": "DynPower",
        "source": "rapl-sysfs",
        "system_features": ["cpu_architecture"],
        "system_values": ["Haswell"],
        "trainer_name": "",
        "filter": "",
    }
    body.update(fields)
    return body


def assert_answers(path: Path, workload: Workload) -> None:
    reply = ask(path, request(workload.container_x[:3]))
    assert reply["msg"] == ""
    assert all(len(v) == 3 for v in reply["powers"].values())


# Answers.


def test_500_rows_get_500_non_negative_values_per_component(
    estimator: Path, workload: Workload
) -> None:
    reply = ask(estimator, request(workload.container_x[:500], output_type="AbsPower"))

    assert reply["msg"] == ""
    assert set(reply["powers"]) == set(COMPONENTS)
    for values in reply["powers"].values():
        assert len(values) == 500
        assert min(values) >= 0


def test_metric_order_in_the_request_is_free(estimator: Path, workload: Workload) -> None:
    rows = workload.container_x[:20]
    shuffled = (2, 0, 1)
    in_order = ask(estimator, request(rows))
    reordered = ask(estimator, request(rows[:, shuffled], tuple(FEATURES[i] for i in shuffled)))

    assert reordered["powers"] == in_order["powers"]


def test_system_features_the_model_does_not_use_are_ignored(
    estimator: Path, workload: Workload
) -> None:
    plain = ask(estimator, request(workload.container_x[:5], system_features=[], system_values=[]))
    extra = ask(
        estimator,
        request(
            workload.container_x[:5],
            system_features=["cpu_architecture", "node_info"],
            system_values=["Sky Lake", "1"],
        ),
    )

    assert extra["powers"] == plain["powers"]


def test_reply_is_compact_json_rounded_to_milliwatts(estimator: Path, workload: Workload) -> None:
    raw = send(estimator, json.dumps(request(workload.container_x[:50])).encode())
    reply = json.loads(raw)

    assert raw == json.dumps(reply, separators=(",", ":")).encode()
    for values in reply["powers"].values():
        assert all(round(v, 3) == v for v in values)


def test_request_without_rows_gets_an_empty_list_per_component(estimator: Path) -> None:
    reply = ask(estimator, request(np.empty((0, 3))))

    assert reply["msg"] == ""
    assert reply["powers"] == {component: [] for component in COMPONENTS}


def test_watts_are_rounded_to_milliwatts_and_whole_ones_written_as_integers() -> None:
    watts = np.array([0.0, -0.0, 1.0, 2.5, 175.64049, 19.4996, 1e16])

    assert compact_watts(watts) == [0, 0, 1, 2.5, 175.64, 19.5, 1e16]
    assert json.dumps(compact_watts(np.zeros(3))) == "[0, 0, 0]"


def test_core_ratio_is_this_machine_over_the_model_machine(
    estimator: Path, workload: Workload
) -> None:
    reply = ask(estimator, request(workload.container_x[:2]))
    refused = ask(estimator, request(workload.container_x[:2], output_type="Nope"))

    assert reply["core_ratio"] == SERVER_CPUS / MODEL_CORES
    assert refused["core_ratio"] == 1.0


def test_trainer_name_selects_the_model(
    estimator: Path, workload: Workload, models: dict[Any, PowerModel]
) -> None:
    rows = workload.container_x[:10]
    for trainer in ("SGDRegressorTrainer", "GradientBoostingRegressorTrainer"):
        reply = ask(estimator, request(rows, trainer_name=trainer))
        expected = models[(trainer, "DynPower")].predict(rows)
        for component, values in reply["powers"].items():
            np.testing.assert_allclose(values, expected[component], atol=5e-4)


def test_a_row_without_activity_draws_no_dynamic_power_from_any_model(
    estimator: Path, workload: Workload, models: dict[Any, PowerModel]
) -> None:
    busy = workload.container_x[:2]
    rows = np.vstack([busy, np.zeros(len(FEATURES))])
    model = models[("GradientBoostingRegressorTrainer", "DynPower")]
    assert any(watts[0] > 0 for watts in model.predict(np.zeros((1, len(FEATURES)))).values())

    dynamic = ask(estimator, request(rows, trainer_name=model.metadata["trainer"]))
    absolute = ask(
        estimator,
        request(rows, trainer_name="GradientBoostingRegressorTrainer", output_type="AbsPower"),
    )

    expected = model.predict(busy)
    for component, watts in dynamic["powers"].items():
        np.testing.assert_allclose(watts[:2], expected[component], atol=5e-4)
        assert watts[2] == 0
    assert absolute["powers"]["package"][2] > 0  # idle power stays in AbsPower


# Framing: where a request ends.


def test_request_split_inside_a_number_a_string_and_a_character_is_answered(
    estimator: Path, workload: Workload
) -> None:
    fields: dict[str, Any] = {"system_values": ["Haswell é"]}
    body = json.dumps(request(workload.container_x[:5], **fields), ensure_ascii=False).encode()
    inside_number = body.index(b"[[") + 4
    inside_string = body.index(b"metrics") + 3
    inside_character = body.index("é".encode()) + 1
    pieces = sorted({inside_string, inside_number, inside_character})

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(15)
        client.connect(str(estimator))
        for start, end in zip([0, *pieces], [*pieces, len(body)], strict=True):
            client.sendall(body[start:end])
            time.sleep(0.05)
        reply = json.loads(read_all(client))

    assert reply["msg"] == ""
    assert len(reply["powers"]["package"]) == 5


def test_request_in_many_small_pieces_is_answered(estimator: Path, workload: Workload) -> None:
    body = json.dumps(request(workload.container_x[:3])).encode()

    reply = ask(estimator, body, pieces=12, pause=0.01)

    assert reply["msg"] == ""


def test_no_reply_before_the_closing_brace_arrives(estimator: Path, workload: Workload) -> None:
    body = json.dumps(request(workload.container_x[:3])).encode()

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(str(estimator))
        client.sendall(body[:-1])
        client.settimeout(0.3)
        with pytest.raises(TimeoutError):
            client.recv(1)
        client.settimeout(15)
        client.sendall(body[-1:])
        reply = json.loads(read_all(client))

    assert reply["msg"] == ""


def test_half_closed_request_is_answered(estimator: Path, workload: Workload) -> None:
    reply = ask(estimator, request(workload.container_x[:4]), half_close=True)

    assert reply["msg"] == ""
    assert len(reply["powers"]["dram"]) == 4


@pytest.mark.parametrize("split", [1, 2, 5])
def test_framer_finds_the_end_wherever_the_chunks_split(split: int) -> None:
    body = json.dumps(
        {"metrics": ['a\\"}', "b{["], "values": [[1.5e3, 12]], "output_type": "Abs\\Power"}
    ).encode()
    for cut in range(0, len(body), split):
        framer = RequestFramer(max_bytes=10_000)
        results = [framer.feed(body[:cut]) if cut else None]
        results += [framer.feed(body[i : i + split]) for i in range(cut, len(body), split)]

        assert results[-1] == body
        assert all(r is None for r in results[:-1])


def test_framer_refuses_objects_nested_too_deep() -> None:
    with pytest.raises(RequestError, match="nests objects deeper than"):
        RequestFramer(10_000).feed(b'{"a":' * 40)


def test_framer_refuses_what_is_not_an_object() -> None:
    with pytest.raises(RequestError, match="must be a JSON object"):
        RequestFramer(100).feed(b"  [1, 2]")


# Refusals: powers {} and a message that says what is wrong; the server carries on.

REFUSALS: dict[str, tuple[dict[str, Any] | bytes, str]] = {
    "invalid JSON": (b'{"metrics": [cache_miss]}', "not valid JSON"),
    "not an object": (b'"hello"', "must be a JSON object"),
    "unknown output type": ({"output_type": "Watts"}, "output_type"),
    "missing key": ({"metrics": None}, "metrics"),
    "rows of the wrong width": (
        {"values": [[1.0, 2.0]]},
        "row 0 has 2 column(s) but metrics names 3",
    ),
    "rows of different widths": (
        {"values": [[1.0, 2.0, 3.0], [1.0, 2.0]]},
        "row 1 has 2 column(s) where row 0 has 3",
    ),
    "values not a list of rows": ({"values": [1.0, 2.0, 3.0]}, "row 0 is not a list"),
    "NaN": (b"NaN", "not valid JSON"),  # not JSON, although Python's json module reads it
    "infinity": (b"1e999", "infinity"),
    "text for a number": ({"values": [["1", 2, 3]]}, "row 0, column 0 is not a number: '1'"),
    "boolean for a number": (b"true", "row 0, column 1 is not a number: True"),
    "null for a number": (b"null", "row 0, column 1 is not a number: None"),
    "unknown source": ({"source": "gpu-magic"}, "unknown energy source"),
    "metrics no model covers": ({"metrics": ["cache_miss", "bpf_cpu_time_ms", "x"]}, "lacks"),
    "bad filter": ({"filter": "mae"}, "filter"),
    "unknown trainer": ({"trainer_name": "OracleTrainer"}, "OracleTrainer"),
}


def refusal_body(case: dict[str, Any] | bytes) -> bytes:
    """Bytes are sent as they are, or put in place of a number; a field set to None is left out."""
    if isinstance(case, bytes) and case.startswith((b"{", b'"')):
        return case
    if isinstance(case, bytes):
        valid = json.dumps(request([[1.0, 2.0, 3.0]])).encode()
        return valid.replace(b"[[1.0, 2.0, 3.0]]", b"[[1.0, " + case + b", 3.0]]")
    fields = {k: v for k, v in case.items() if v is not None}
    body = request([[1.0, 2.0, 3.0]], **fields)
    if "metrics" in fields:
        body["values"] = [[1.0] * len(fields["metrics"])]
    for absent in set(case) - set(fields):
        del body[absent]
    return json.dumps(body).encode()


@pytest.mark.parametrize("name", REFUSALS)
def test_bad_request_gets_an_error_reply_and_the_server_carries_on(
    estimator: Path, workload: Workload, name: str
) -> None:
    case, words = REFUSALS[name]

    reply = ask(estimator, refusal_body(case))

    assert reply["powers"] == {}
    assert words in reply["msg"], reply["msg"]
    assert_answers(estimator, workload)


def test_missing_features_are_named(estimator: Path) -> None:
    reply = ask(estimator, request([[1.0, 2.0]], metrics=("cache_miss", "bpf_cpu_time_ms")))

    assert "CounterOnly lacks cpu_cycles, cpu_instructions" in reply["msg"]


def test_an_empty_metric_list_is_called_so(estimator: Path) -> None:
    reply = ask(estimator, request([[]], metrics=()))

    assert reply["powers"] == {}
    assert "covers an empty metric list: CounterOnly lacks" in reply["msg"]


def test_truncated_request_gets_an_error_reply(estimator: Path, workload: Workload) -> None:
    body = json.dumps(request(workload.container_x[:3])).encode()

    reply = ask(estimator, body[:-10], half_close=True)

    assert reply["powers"] == {}
    assert "before its JSON object was complete" in reply["msg"]


STRICT_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def strict_estimator(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Path]:
    directory = tmp_path_factory.mktemp("strict")
    settings = socket_settings(
        directory,
        model_path,
        estimator_max_request_bytes=4096,
        estimator_read_timeout=STRICT_TIMEOUT,
    )
    with serving(settings) as server:
        yield server.socket_path


def test_request_beyond_the_size_limit_is_refused(strict_estimator: Path) -> None:
    body = json.dumps(request(np.ones((1000, 3)))).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(15)
        client.connect(str(strict_estimator))
        try:
            client.sendall(body)
        except (BrokenPipeError, ConnectionResetError):
            logger.info("server closed while the oversized request was still being written")
        reply = json.loads(read_all(client))

    assert reply["powers"] == {}
    assert "exceeds 4096 bytes" in reply["msg"]


def test_silent_client_times_out_without_holding_up_others(
    strict_estimator: Path, workload: Workload
) -> None:
    assert_answers(strict_estimator, workload)  # the model is loaded and cached
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.settimeout(15)
        silent.connect(str(strict_estimator))
        silent.sendall(b'{"metrics": ["cache')
        started = time.monotonic()
        assert_answers(strict_estimator, workload)
        answered_in = time.monotonic() - started
        reply = json.loads(read_all(silent))

    assert answered_in < STRICT_TIMEOUT / 2
    assert reply["powers"] == {}
    assert f"no complete JSON object within {STRICT_TIMEOUT:g} s" in reply["msg"]


def test_client_that_leaves_early_does_not_harm_the_server(
    estimator: Path, workload: Workload
) -> None:
    body = json.dumps(request(workload.container_x[:200])).encode()
    for cut in (0, 10, len(body) // 2, len(body)):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(estimator))
            client.sendall(body[:cut])

    assert_answers(estimator, workload)


VALID = json.dumps(request([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])).encode()

garbage = st.one_of(
    st.binary(max_size=300),
    st.integers(0, len(VALID) - 1).map(lambda cut: VALID[:cut]),
    st.tuples(st.integers(0, len(VALID) - 1), st.binary(min_size=1, max_size=3)).map(
        lambda edit: VALID[: edit[0]] + edit[1] + VALID[edit[0] + 1 :]
    ),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=garbage)
def test_any_bytes_get_a_json_reply_with_a_powers_map(
    estimator: Path, workload: Workload, body: bytes
) -> None:
    reply = json.loads(send(estimator, body, half_close=True))

    assert isinstance(reply["powers"], dict)
    assert isinstance(reply["msg"], str)
    assert isinstance(reply["core_ratio"], float | int)
    assert (reply["powers"] == {}) == (reply["msg"] != "")
    assert_answers(estimator, workload)


entries = st.one_of(
    st.floats(),
    st.integers(-(2**70), 2**70),
    st.booleans(),
    st.none(),
    st.text(max_size=2),
    st.lists(st.integers(), max_size=1),
)
matrices = st.one_of(
    st.lists(st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=3, max_size=3)),
    st.lists(st.lists(entries, max_size=3), max_size=4),
    st.one_of(st.text(max_size=3), st.integers(), st.dictionaries(st.text(max_size=2), st.none())),
)


def is_number_matrix(values: Any) -> bool:
    """The specification of a valid ``values``: rows of one width of finite non-boolean numbers."""
    if not isinstance(values, list) or not all(isinstance(row, list) for row in values):
        return False
    numbers = [v for row in values for v in row]
    return (
        len({len(row) for row in values}) <= 1
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in numbers)
        and all(np.isfinite(float(v)) for v in numbers)
    )


@settings(max_examples=300, deadline=None)
@given(values=matrices)
def test_values_become_a_float_matrix_exactly_when_they_are_rows_of_finite_numbers(
    values: Any,
) -> None:
    if not is_number_matrix(values):
        with pytest.raises(ValueError):
            value_matrix(values)
        return

    matrix = value_matrix(values)

    assert matrix.dtype == np.float64 and matrix.shape[0] == len(values)
    expected = np.array(values, dtype=float)
    np.testing.assert_array_equal(matrix.reshape(expected.shape), expected)


json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers(-(10**30), 10**30) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=6,
)


@st.composite
def mangled_requests(draw: st.DrawFn) -> bytes:
    """A valid request with some fields given values of any JSON type, or an overflowing number.

    Python writes NaN and infinite floats as ``NaN`` and ``Infinity``, which are not JSON.
    """
    body = request([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    for key in draw(st.sets(st.sampled_from(sorted(body)), max_size=3)):
        body[key] = draw(json_values)
    text = json.dumps(body)
    if draw(st.booleans()):
        text = text.replace("5.0", draw(st.sampled_from(["1e999", "-1e400", "1" * 400])))
    return text.encode()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=mangled_requests(),
    pieces=st.integers(1, 4),
    leave_after=st.none() | st.floats(0.0, 1.0),
)
def test_mangled_requests_get_json_replies_and_the_server_keeps_answering(
    estimator: Path, workload: Workload, body: bytes, pieces: int, leave_after: float | None
) -> None:
    if leave_after is None:
        reply = json.loads(send(estimator, body, pieces=pieces))

        assert isinstance(reply["powers"], dict)
        assert (reply["powers"] == {}) == (reply["msg"] != "")
    else:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(estimator))
            client.sendall(body[: int(len(body) * leave_after)])

    assert_answers(estimator, workload)


def test_server_answers_after_the_garbage(estimator: Path, workload: Workload) -> None:
    assert_answers(estimator, workload)


# Load and reply size.


def test_eight_concurrent_clients_of_500_requests_of_100_rows_all_succeed(
    estimator: Path, workload: Workload
) -> None:
    boosted = request(workload.container_x[:100], trainer_name="GradientBoostingRegressorTrainer")
    body = json.dumps(boosted).encode()

    def client(_: int) -> int:
        replies = [json.loads(send(estimator, body)) for _ in range(500)]
        return sum(r["msg"] == "" and len(r["powers"]["package"]) == 100 for r in replies)

    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        succeeded = list(pool.map(client, range(8)))
    logger.info("8 x 500 requests of 100 rows in %.1f s", time.monotonic() - started)

    assert succeeded == [500] * 8


def test_reply_larger_than_the_socket_buffer_reaches_a_slow_reader_whole(
    estimator: Path,
) -> None:
    rows = 30_000  # 240 KB of request, within the fixture's limit; 500 KB of reply
    body = json.dumps(request([[1, 2, 3]] * rows), separators=(",", ":")).encode()

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(15)
        client.connect(str(estimator))
        client.sendall(body)
        buffered = client.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        chunks = []
        while chunk := client.recv(KEPLER_READ_BYTES):
            chunks.append(chunk)
            time.sleep(0.0005)
    raw = b"".join(chunks)
    reply = json.loads(raw)

    assert len(raw) > 2 * buffered
    assert reply["msg"] == ""
    assert all(len(values) == rows for values in reply["powers"].values())


def reply_bytes(path: Path, rows: np.ndarray) -> int:
    return len(send(path, json.dumps(request(rows)).encode()))


def test_reply_for_150_rows_of_4_components_fits_in_one_kepler_read(
    estimator: Path, workload: Workload
) -> None:
    rows = np.random.default_rng(7).permutation(workload.container_x)
    reply = json.loads(send(estimator, json.dumps(request(rows[:150])).encode()))

    assert len(reply["powers"]) == 4
    assert max(reply["powers"]["package"]) > 1.0  # realistic, not all zero
    assert reply_bytes(estimator, rows[:150]) <= KEPLER_READ_BYTES

    low, high = 150, 2000  # the largest row count whose reply still fits
    while low < high:
        middle = (low + high + 1) // 2
        fits = reply_bytes(estimator, rows[:middle]) <= KEPLER_READ_BYTES
        low, high = (middle, high) if fits else (low, middle - 1)
    logger.info("replies of up to %d rows x 4 components fit in %d bytes", low, KEPLER_READ_BYTES)
    assert low >= 150


# Models: weights, old archives, new publishes, other routes.


def test_sgd_weight_json_evaluated_as_kepler_does_gives_the_estimator_watts(
    estimator: Path, workload: Workload, model_path: Path
) -> None:
    folder = model_path / PIPELINE / "rapl-sysfs" / "AbsPower" / "CounterOnly"
    weights = json.loads((folder / "SGDRegressorTrainer_0.json").read_text())
    metrics = ("cpu_instructions", "cache_miss", "cpu_cycles")
    rows = workload.node_x[:40][:, [FEATURES.index(m) for m in metrics]]

    reply = ask(
        estimator,
        request(rows, metrics, output_type="AbsPower", trainer_name="SGDRegressorTrainer"),
    )

    for component, watts in kepler_watts(weights, metrics, rows).items():
        np.testing.assert_allclose(reply["powers"][component], watts, rtol=0, atol=5e-4 + 1e-9)


def kepler_watts(weights: dict[str, Any], metrics: tuple[str, ...], rows: Any) -> dict[str, Any]:
    """Kepler's evaluation of linear weight JSON: bias + sum of weight * value / scale."""
    watts = {}
    for component, body in weights.items():
        if not isinstance(body, dict):
            continue  # model_name, machine_spec, mae beside the components
        variables = body["All_Weights"]["Numerical_Variables"]
        watts[component] = np.clip(
            [
                body["All_Weights"]["Bias_Weight"]
                + sum(
                    variables[m]["weight"] * v / variables[m]["scale"]
                    for m, v in zip(metrics, row, strict=True)
                )
                for row in rows
            ],
            0,
            None,
        )
    return watts


@pytest.mark.parametrize("output_type", ["AbsPower", "DynPower"])
def test_boosted_trees_walked_together_predict_what_the_model_predicts(
    workload: Workload, models: dict[Any, PowerModel], output_type: str
) -> None:
    model = models[("GradientBoostingRegressorTrainer", output_type)]
    outside = workload.node_x.max(axis=0) * 10
    rows = np.vstack([workload.container_x[:300], workload.node_x[:300], np.zeros(3), outside])

    served = ServingModel.of(model)

    assert served.forest is not None and is_quick(served)
    expected, walked = model.predict(rows), served.predict(rows)
    for component, watts in expected.items():
        np.testing.assert_allclose(walked[component], watts, rtol=0, atol=1e-9)


def test_values_beyond_float32_fall_on_the_high_side_of_every_split_without_warning(
    models: dict[Any, PowerModel],
) -> None:
    model = models[("GradientBoostingRegressorTrainer", "AbsPower")]
    huge = np.full((2, 3), 1e308)
    served = ServingModel.of(model)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        walked = served.predict(huge)
    highest = served.predict(np.full((1, 3), np.inf))
    for component, watts in walked.items():
        np.testing.assert_array_equal(watts, np.repeat(highest[component], 2))


def test_trees_deeper_than_the_forest_takes_keep_their_own_walk(
    workload: Workload, models: dict[Any, PowerModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = models[("GradientBoostingRegressorTrainer", "AbsPower")]
    monkeypatch.setattr(evaluation, "MAX_DEPTH", 1)

    served = ServingModel.of(model)

    assert served.forest is None and not is_quick(served)  # evaluated off the event loop
    rows = workload.node_x[:50]
    np.testing.assert_array_equal(served.predict(rows)["package"], model.predict(rows)["package"])


def test_a_loaded_model_is_offered_from_cache_only_while_the_catalogue_is_fresh(
    model_path: Path,
) -> None:
    now = [0.0]
    provider = ModelProvider(Settings(model_path=model_path), clock=lambda: now[0])
    query = ModelQuery(metrics=FEATURES, output_type="DynPower")

    before = provider.cached(query)
    model = provider.model_for(query)
    now[0] = 0.5
    fresh = provider.cached(query)
    now[0] = 1.0
    stale = provider.cached(query)

    assert before is None and fresh is model and stale is None


MODEL_DB = REPO / "tests" / "data" / "model-db"
OLD_BPF_MODELS = MODEL_DB / "ec2-0.7.11" / "rapl-sysfs" / "AbsPower" / "BPFOnly"
BPF = ("bpf_cpu_time_ms", "bpf_page_cache_hit")
BPF_ROWS = [[10000.0, 0.0], [95877.0, 5.0], [0.0, 0.0]]


def test_weight_json_of_an_old_model_gives_the_spec_figures() -> None:
    weights = json.loads((OLD_BPF_MODELS / "SGDRegressorTrainer_0.json").read_text())

    model = model_from_weights("SGDRegressorTrainer_0", "SGDRegressorTrainer", weights, str)
    watts = model.predict(np.array([[10000.0, 0.0]]))

    assert watts["package"][0] == pytest.approx(175.64, abs=0.005)  # SPEC section 5
    assert watts["dram"][0] == pytest.approx(19.50, abs=0.005)


def test_pickled_archives_on_disk_are_served_from_their_weight_json(tmp_path: Path) -> None:
    weights = json.loads((OLD_BPF_MODELS / "SGDRegressorTrainer_1.json").read_text())

    with serving(socket_settings(tmp_path, MODEL_DB)) as server:
        # The best AbsPower model, GradientBoostingRegressorTrainer_1, has only pickles.
        reply = ask(server.socket_path, request(BPF_ROWS, BPF, output_type="AbsPower"))
        dynamic = ask(server.socket_path, request(BPF_ROWS, BPF, output_type="DynPower"))

    for component, watts in kepler_watts(weights, BPF, BPF_ROWS).items():
        np.testing.assert_allclose(reply["powers"][component], watts, atol=5e-4 + 1e-9)
    assert reply["core_ratio"] == pytest.approx(SERVER_CPUS / 72, abs=1e-6)  # node type 1
    assert dynamic["powers"] == {}
    assert "is a pickle" in dynamic["msg"]


def test_malformed_weight_json_on_disk_gets_an_error_reply_and_the_server_carries_on(
    tmp_path: Path,
) -> None:
    models = tmp_path / "models"
    shutil.copytree(MODEL_DB, models)
    for weight_file in models.glob("*/rapl-sysfs/AbsPower/BPFOnly/SGDRegressorTrainer_*.json"):
        weights = json.loads(weight_file.read_text())
        for body in weights.values():
            del body["All_Weights"]["Numerical_Variables"]
        weight_file.write_text(json.dumps(weights))
    sgd = request(BPF_ROWS, BPF, output_type="AbsPower", trainer_name="SGDRegressorTrainer")

    with serving(socket_settings(tmp_path, models)) as server:
        refused = [ask(server.socket_path, sgd) for _ in range(2)]

    assert refused[0]["powers"] == {}
    assert "Numerical_Variables" in refused[0]["msg"]
    assert refused[1] == refused[0]


@pytest.mark.parametrize(
    "weights",
    [
        {"package": {"All_Weights": {"Bias_Weight": 1.0}}},
        {"package": {"All_Weights": {"Bias_Weight": 1.0, "Numerical_Variables": []}}},
        {"package": {"All_Weights": {"Bias_Weight": "x", "Numerical_Variables": {}}}},
        {"package": {"All_Weights": {"CurveFit_Weights": 3, "Numerical_Variables": {}}}},
        {"package": {"All_Weights": {"Numerical_Variables": {"a": {"scale": "big"}}}}},
        {"package": []},
    ],
    ids=["no variables", "variables a list", "bias text", "curve not a list", "scale text", "list"],
)
def test_malformed_weight_json_is_a_model_file_error(weights: dict[str, Any]) -> None:
    with pytest.raises(ModelFileError):
        model_from_weights(
            "LogarithmicRegressionTrainer_0", "LogarithmicRegressionTrainer", weights, lambda c: "a"
        )


def test_a_new_publish_is_used_without_restart(
    tmp_path: Path, workload: Workload, models: dict[Any, PowerModel]
) -> None:
    sgd = models[("SGDRegressorTrainer", "DynPower")]
    boosted = models[("GradientBoostingRegressorTrainer", "DynPower")]
    publish_models(tmp_path / "models", [sgd])
    settings = socket_settings(tmp_path, tmp_path / "models")
    provider = ModelProvider(settings, refresh_seconds=0.0)
    rows = workload.container_x[:5]
    boosted_request = request(rows, trainer_name=boosted.metadata["trainer"])

    with serving(settings, provider=provider) as server:
        before = ask(server.socket_path, boosted_request)
        publish_models(tmp_path / "models", [boosted])
        after = ask(server.socket_path, boosted_request)

    assert before["powers"] == {}
    expected = boosted.predict(rows)
    np.testing.assert_allclose(after["powers"]["package"], expected["package"], atol=5e-4)


def test_initial_model_url_is_used_when_nothing_is_published(
    tmp_path: Path, workload: Workload, models: dict[Any, PowerModel]
) -> None:
    model = models[("SGDRegressorTrainer", "AbsPower")]
    archive = tmp_path / "SGDRegressorTrainer_0.zip"
    archive.write_bytes(model.to_archive())
    settings = socket_settings(tmp_path, tmp_path / "empty", node_total_init_url=archive.as_uri())
    rows = workload.node_x[:3]

    with serving(settings) as server:
        reply = ask(server.socket_path, request(rows, output_type="AbsPower"))
        dynamic = ask(server.socket_path, request(rows))

    expected = model.predict(rows)
    np.testing.assert_allclose(reply["powers"]["package"], expected["package"], atol=5e-4)
    assert dynamic["powers"] == {}
    assert "NODE_COMPONENTS_INIT_URL is not set" in dynamic["msg"]


def test_model_is_fetched_from_the_model_server_when_nothing_is_published(
    tmp_path: Path, workload: Workload, model_path: Path, models: dict[Any, PowerModel]
) -> None:
    app = create_app(Settings(model_path=model_path))
    rows = workload.container_x[:10]
    sgd = request(rows, trainer_name="SGDRegressorTrainer")

    with running_server(app) as url:
        settings = socket_settings(
            tmp_path, tmp_path / "empty", model_server_enable=True, model_server_url=url
        )
        with serving(settings) as server:
            reply = ask(server.socket_path, sgd)

    expected = models[("SGDRegressorTrainer", "DynPower")].predict(rows)
    for component, values in reply["powers"].items():
        np.testing.assert_allclose(values, expected[component], atol=5e-4)
    assert reply["core_ratio"] == SERVER_CPUS / MODEL_CORES


def test_pickled_archive_from_the_model_server_is_replaced_by_its_weights(
    tmp_path: Path,
) -> None:
    weights = json.loads((OLD_BPF_MODELS / "SGDRegressorTrainer_1.json").read_text())

    with running_server(create_app(Settings(model_path=MODEL_DB))) as url:
        settings = socket_settings(
            tmp_path, tmp_path / "empty", model_server_enable=True, model_server_url=url
        )
        with serving(settings) as server:
            reply = ask(server.socket_path, request(BPF_ROWS, BPF, output_type="AbsPower"))

    for component, watts in kepler_watts(weights, BPF, BPF_ROWS).items():
        np.testing.assert_allclose(reply["powers"][component], watts, atol=5e-4 + 1e-9)
    assert reply["core_ratio"] == pytest.approx(SERVER_CPUS / 72, abs=1e-6)


def test_unreachable_model_server_is_not_asked_on_every_request(
    tmp_path: Path, workload: Workload
) -> None:
    settings = socket_settings(
        tmp_path,
        tmp_path / "empty",
        model_server_enable=True,
        model_server_url="http://127.0.0.1:9",
    )

    with serving(settings) as server:
        first = ask(server.socket_path, request(workload.container_x[:2]))
        second = ask(server.socket_path, request(workload.container_x[:2]))

    assert first["powers"] == {} and "model server" in first["msg"]
    assert "next try in" in second["msg"]


def test_failed_downloads_back_off_and_each_cause_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    now = [0.0]
    settings = Settings(
        model_path=tmp_path / "empty",
        model_server_enable=True,
        model_server_url="http://127.0.0.1:9",
    )
    provider = ModelProvider(settings, clock=lambda: now[0])
    query = ModelQuery(metrics=FEATURES, output_type="DynPower")
    messages = []

    with caplog.at_level(logging.WARNING, logger="estimator.models"):
        for moment in (0.0, 0.5, 1.5, 2.0, 3.6):
            now[0] = moment
            with pytest.raises(ModelUnavailableError) as refused:
                provider.model_for(query)
            messages.append(str(refused.value))

    tried = ["next try in" not in m for m in messages]
    assert tried == [True, False, True, False, True]  # after 1 s, then after 2 s
    assert len([r for r in caplog.records if "model server" in r.getMessage()]) == 1


# The socket file and the process.


def test_stale_socket_file_is_replaced_and_a_live_one_is_not(
    tmp_path: Path, model_path: Path
) -> None:
    settings = socket_settings(tmp_path, model_path)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(settings.estimator_socket))
    stale.close()  # the file stays, nobody listens

    with serving(settings) as server:
        assert server.serving
        with pytest.raises(SocketInUseError), serving(settings):
            pass

    assert not settings.estimator_socket.exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_finishes_the_request_in_flight_and_removes_the_socket(
    tmp_path: Path, model_path: Path, workload: Workload, signum: signal.Signals
) -> None:
    path = tmp_path / "est.sock"
    script = (
        "import sys; from pathlib import Path; from estimator.server import run_estimator; "
        "from kepler_model.settings import Settings; "
        "run_estimator(Settings(estimator_socket=Path(sys.argv[1]), model_path=Path(sys.argv[2])))"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script, str(path), str(model_path)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        deadline = time.monotonic() + 30
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        body = json.dumps(request(workload.container_x[:3])).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(15)
            client.connect(str(path))
            client.sendall(body[:20])
            time.sleep(0.2)
            process.send_signal(signum)
            time.sleep(0.3)
            client.sendall(body[20:])
            reply = json.loads(read_all(client))
        code = process.wait(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()

    assert reply["msg"] == "" and len(reply["powers"]["package"]) == 3
    assert code == 0
    assert not path.exists()
