"""Estimator latency and throughput over a real Unix socket, beside in-process predict time.

    python benchmarks/estimator.py [--requests 500] [--seconds 3]

A GradientBoosting and an SGD model (CounterOnly, AbsPower) are fitted on synthetic rows of
realistic magnitude and published into a temporary MODEL_PATH; the estimator runs in its own
process through ``run_estimator``, as in production, and this process is the client (one
connection per request, as Kepler does). Client and server share the machine's CPUs, so the
load average is printed beside the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# Run as a script, this file's folder comes first on sys.path and its name would shadow the
# estimator package; the repository goes first instead.
sys.path.insert(0, str(REPO))

from estimator.models import ModelProvider, core_ratio  # noqa: E402
from estimator.protocol import KEPLER_READ_BYTES, EstimationReply, parse_request  # noqa: E402
from estimator.server import estimate  # noqa: E402
from kepler_model.settings import Settings  # noqa: E402
from modelling.power_model import PowerModel  # noqa: E402
from modelling.trainers import make_trainer  # noqa: E402
from modelling.training import TrainingSet, train_model  # noqa: E402
from storage.pipelines import PublishedModel, publish  # noqa: E402

FEATURES = ("cache_miss", "cpu_cycles", "cpu_instructions")
TRAINERS = ("GradientBoostingRegressorTrainer", "SGDRegressorTrainer")
ROW_COUNTS = (1, 100, 500)
SERVER_SCRIPT = (
    "import logging, sys; from pathlib import Path; "
    "from estimator.server import run_estimator; from kepler_model.settings import Settings; "
    "logging.basicConfig(level=logging.ERROR); "
    "run_estimator(Settings(estimator_socket=Path(sys.argv[1]), model_path=Path(sys.argv[2])))"
)


def synthetic_rows(count: int, rng: np.random.Generator) -> np.ndarray:
    """Node-level rates of the size Kepler's 2023 dump shows (per second)."""
    scale = np.array([2e6, 1.5e9, 1.5e9])
    return rng.uniform(0.0, 1.0, (count, len(FEATURES))) * scale


def publish_models(model_path: Path, rng: np.random.Generator) -> None:
    x = synthetic_rows(400, rng)
    load = x / x.max(axis=0)
    noise = rng.normal(0, 2, len(x))
    y = {
        "package": 40 + 90 * load[:, 2] + 30 * load[:, 0] + noise,
        "core": np.zeros(len(x)),
        "uncore": np.zeros(len(x)),
        "dram": 38 + 12 * load[:, 0] + noise / 4,
    }
    published = []
    for trainer in TRAINERS:
        data = TrainingSet(x, y, FEATURES, "CounterOnly", "AbsPower", 0, {"cores": 32})
        model = train_model(make_trainer(trainer), data)
        published.append(PublishedModel("rapl-sysfs", "AbsPower", "CounterOnly", model))
    publish(model_path, "kepler-default", published, {"isolator": "none"}, {})


def request_body(rows: np.ndarray, trainer: str) -> bytes:
    body = {
        "metrics": list(FEATURES),
        "values": rows.tolist(),
        "output_type": "AbsPower",
        "source": "rapl-sysfs",
        "system_features": ["cpu_architecture"],
        "system_values": ["Sky Lake"],
        "trainer_name": trainer,
        "filter": "",
    }
    return json.dumps(body).encode()


def ask(path: Path, body: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(str(path))
        client.sendall(body)
        chunks = []
        while chunk := client.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def start_estimator(path: Path, model_path: Path) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT, str(path), str(model_path)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    deadline = time.monotonic() + 60
    while not path.exists():
        if time.monotonic() > deadline or process.poll() is not None:
            raise RuntimeError("the estimator did not start")
        time.sleep(0.05)
    return process


def latencies(path: Path, body: bytes, count: int) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        reply = ask(path, body)
        times.append(time.perf_counter() - started)
        if b'"msg":""' not in reply:
            raise RuntimeError(f"estimator refused the request: {reply[:300]!r}")
    return times


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000


def throughput(path: Path, body: bytes, clients: int, seconds: float) -> float:
    counts = [0] * clients
    stop = time.monotonic() + seconds

    def client(index: int) -> None:
        while time.monotonic() < stop:
            ask(path, body)
            counts[index] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.monotonic() - started)


def in_process_ms(function: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def rows_fitting(provider: ModelProvider, trainer: str, rng: np.random.Generator) -> int:
    """The largest row count whose reply fits in one Kepler read."""
    rows = synthetic_rows(2000, rng)
    low, high = 0, len(rows)
    while low < high:
        middle = (low + high + 1) // 2
        fits = len(estimate(request_body(rows[:middle], trainer), provider, 1)) <= KEPLER_READ_BYTES
        low, high = (middle, high) if fits else (low, middle - 1)
    return low


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500, help="requests per latency figure")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of a throughput run")
    args = parser.parse_args()
    rng = np.random.default_rng(0)

    with tempfile.TemporaryDirectory(prefix="est-bench-") as scratch:
        model_path, path = Path(scratch) / "models", Path(scratch) / "e.sock"
        publish_models(model_path, rng)
        provider = ModelProvider(Settings(model_path=model_path))
        process = start_estimator(path, model_path)
        try:
            run(path, provider, args, rng)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)


def run(
    path: Path, provider: ModelProvider, args: argparse.Namespace, rng: np.random.Generator
) -> None:
    print(f"estimator benchmark: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    print(f"{args.requests} requests per latency figure, one connection per request")
    print(f"load average at start: {os.getloadavg()[0]:.1f}\n")
    header = (
        f"{'model':<17}{'rows':>5}{'p50 ms':>8}{'p99 ms':>8}{'generic':>9}{'predict':>9}"
        f"{'+encode':>9}{'in-proc':>9}{'p99/+enc':>9}{'reply B':>8}"
    )
    print(header)
    print("-" * len(header))
    for trainer in TRAINERS:
        for count in ROW_COUNTS:
            print(latency_line(path, provider, trainer, synthetic_rows(count, rng), args.requests))
    print(
        "\ngeneric: PowerModel.predict, component by component; predict: the estimator's "
        "evaluation\n(trees of all components walked together); +encode: predict and the reply "
        "bytes;\nin-proc: parse, validate, look up, predict and encode, as the server does"
    )
    print("\nthroughput, 100 rows per request:")
    for trainer in TRAINERS:
        body = request_body(synthetic_rows(100, rng), trainer)
        for clients in (1, 8):
            rate = throughput(path, body, clients, args.seconds)
            print(f"  {trainer:<34} {clients} client(s): {rate:8.0f} req/s")
    print(f"\nrows whose 4-component reply fits in {KEPLER_READ_BYTES} bytes (values ~40-160 W):")
    for trainer in TRAINERS:
        print(f"  {trainer:<34} {rows_fitting(provider, trainer, rng)}")
    print(f"\nload average at end: {os.getloadavg()[0]:.1f}")


def latency_line(
    path: Path, provider: ModelProvider, trainer: str, rows: np.ndarray, requests: int
) -> str:
    body = request_body(rows, trainer)
    ask(path, body)  # load the model
    times = latencies(path, body, requests)
    model = provider.model_for(parse_request(body).model_query())
    generic = PowerModel(model.name, model.features, model.scale, model.components)
    ratio = core_ratio(model, os.cpu_count() or 1)

    def encoded() -> bytes:
        return EstimationReply.from_powers(model.predict(rows), ratio).encode()

    predict = in_process_ms(lambda: model.predict(rows), 50)
    with_encoding = in_process_ms(encoded, 50)
    p99 = percentile(times, 99)
    return (
        f"{trainer.removesuffix('RegressorTrainer'):<17}{len(rows):>5}"
        f"{percentile(times, 50):>8.2f}{p99:>8.2f}"
        f"{in_process_ms(lambda: generic.predict(rows), 50):>9.3f}{predict:>9.3f}"
        f"{with_encoding:>9.3f}{in_process_ms(lambda: estimate(body, provider, 1), 50):>9.3f}"
        f"{p99 / with_encoding:>9.1f}{len(ask(path, body)):>8}"
    )


if __name__ == "__main__":
    main()
