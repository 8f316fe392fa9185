"""The old implementation's 36-model job through ``POST /train`` on a running train API.

9 trainers (all but LogisticRegressionTrainer) x CounterOnly and CounterIRQCombined x AbsPower
and DynPower on the bundled 2023 Kepler dump, sent as one plain JSON request, as the old
server was measured (7 to 9.6 s per request, about 290 MB peak; target: at most half the time,
no more memory).

The train API runs in its own process under uvicorn, as deployed, against a Prefect API
server that this script starts (and stops) beside it. Printed: wall time of each request (the
first one also warms the server: imports, Prefect client), the server process's resident
memory when idle, its peak (Linux VmHWM, reset before each request) over each request, and the
Prefect API server's resident memory for context.

    python benchmarks/train_api.py [--requests 5] [--task-runner thread|dask]
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
DUMP = ROOT / "kepler_model" / "data" / "kepler_workload_2023.json.gz"
TRAINERS = [
    "SGDRegressorTrainer",
    "LinearRegressionTrainer",
    "PolynomialRegressionTrainer",
    "GradientBoostingRegressorTrainer",
    "KNeighborsRegressorTrainer",
    "SVRRegressorTrainer",
    "XgboostFitTrainer",
    "LogarithmicRegressionTrainer",
    "ExponentialRegressionTrainer",
]
EXPECTED_MODELS = len(TRAINERS) * 2 * 2


@dataclass(frozen=True)
class Measurement:
    seconds: float
    before_mib: float
    peak_mib: float
    models: int


def request_body() -> bytes:
    with gzip.open(DUMP) as handle:
        dump = json.load(handle)
    trainer = {"abs_trainers": TRAINERS, "dyn_trainers": TRAINERS}
    return json.dumps({"name": "bench-36", "trainer": trainer, "prom_response": dump}).encode()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def serve(port: int, model_path: Path, task_runner: str) -> None:
    """The server process: the train API under uvicorn."""
    import uvicorn

    from kepler_model.settings import Settings
    from serving.train_api import create_train_app

    settings = Settings(model_path=model_path, train_api_port=port, task_runner=task_runner)
    uvicorn.run(create_train_app(settings), host="127.0.0.1", port=port, log_level="warning")


@contextmanager
def prefect_api() -> Iterator[tuple[str, int]]:
    """A Prefect API server of our own (its URL and process id), stopped on the way out."""
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    try:
        assert server.server_process is not None
        yield server.api_url, server.server_process.pid
    finally:
        server.stop()


@contextmanager
def train_api(api_url: str, model_path: Path, task_runner: str) -> Iterator[tuple[str, int]]:
    port = free_port()
    command = [
        sys.executable,
        __file__,
        "--serve",
        str(port),
        "--model-path",
        str(model_path),
        "--task-runner",
        task_runner,
    ]
    env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_LOGGING_LEVEL": "WARNING"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process)
        yield f"http://127.0.0.1:{port}", process.pid
    finally:
        process.terminate()
        process.wait(timeout=30)


def wait_healthy(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"train API exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise SystemExit("train API did not answer /healthz within 120 s")


def status_mib(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise SystemExit(f"/proc/{pid}/status has no {field}")


def reset_peak(pid: int) -> None:
    """Linux: writing 5 to clear_refs brings VmHWM down to the current resident size."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def train_once(url: str, pid: int, body: bytes) -> Measurement:
    reset_peak(pid)
    before = status_mib(pid, "VmRSS")
    started = time.perf_counter()
    reply = httpx.post(
        f"{url}/train", content=body, headers={"Content-Type": "application/json"}, timeout=600
    )
    seconds = time.perf_counter() - started
    if reply.status_code != 200:
        raise SystemExit(f"POST /train answered {reply.status_code}: {reply.text[:500]}")
    with zipfile.ZipFile(io.BytesIO(reply.content)) as pipeline:
        models = sum(1 for n in pipeline.namelist() if n.endswith(".zip"))
    return Measurement(seconds, before, status_mib(pid, "VmHWM"), models)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5, help="timed requests after the first")
    parser.add_argument("--task-runner", default="thread", choices=("thread", "dask"))
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model-path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.model_path, args.task_runner)
        return

    body = request_body()
    with tempfile.TemporaryDirectory(prefix="bench-train-api-") as tmp:
        with (
            prefect_api() as (api, api_pid),
            train_api(api, Path(tmp) / "models", args.task_runner) as (url, pid),
        ):
            idle = status_mib(pid, "VmRSS")
            first = train_once(url, pid, body)
            timed = [train_once(url, pid, body) for _ in range(args.requests)]
            prefect_rss = status_mib(api_pid, "VmRSS")
    report(args.task_runner, len(body), idle, first, timed)
    print(f"Prefect API server (separate process, for context): {prefect_rss:.0f} MiB resident")


def report(
    runner: str,
    body_bytes: int,
    idle: float,
    first: Measurement,
    timed: list[Measurement],
) -> None:
    seconds = [m.seconds for m in timed]
    print(f"request: {body_bytes / 1e6:.1f} MB of JSON, {EXPECTED_MODELS} models expected")
    print(f"task runner: {runner}; models in each reply: {sorted({m.models for m in timed})}")
    print(
        f"first request (warms the server): {first.seconds:.2f} s, resident before "
        f"{first.before_mib:.0f} MiB, peak {first.peak_mib:.0f} MiB"
    )
    for number, m in enumerate(timed, start=1):
        print(
            f"request {number}: {m.seconds:.2f} s, resident before {m.before_mib:.0f} MiB, "
            f"peak {m.peak_mib:.0f} MiB (+{m.peak_mib - m.before_mib:.0f})"
        )
    print(
        f"wall time per request: median {statistics.median(seconds):.2f} s, "
        f"best {min(seconds):.2f} s, worst {max(seconds):.2f} s (old: 7 to 9.6 s)"
    )
    print(f"server resident when idle after start: {idle:.0f} MiB")
    peak = max(m.peak_mib for m in [first, *timed])
    print(f"server peak over all requests: {peak:.0f} MiB (old: about 290 MB)")
    print(f"load average (1, 5, 15 min) at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
