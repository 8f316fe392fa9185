"""Latency and throughput of ``POST /model`` against a real uvicorn server on loopback.

The server runs in its own process (``run_model_server``, as deployed), so that the clients'
work does not share its interpreter. Each scenario sends a bounded number of Kepler-shaped
requests from 1 and from 8 concurrent clients (threads, one keep-alive connection each) and
prints p50/p99 latency, requests per second and the server's CPU time per request (from
/proc, Linux only). Latency and throughput depend on what else the machine runs; CPU time per
request hardly does, so it is the figure to compare between changes on a busy machine.

    python benchmarks/model_server.py [--requests 2000] [--model-path tests/data/model-db]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_PATH = ROOT / "tests" / "data" / "model-db"

GO_REQUEST: dict[str, Any] = {
    "metrics": ["bpf_cpu_time_ms", "bpf_page_cache_hit"],
    "output_type": "AbsPower",
    "source": "rapl-sysfs",
    "node_type": 1,
    "weight": True,
    "trainer_name": "SGDRegressorTrainer",
    "filter": "",
}

SCENARIOS: dict[str, dict[str, Any]] = {
    "weight true (SGD weight JSON)": GO_REQUEST,
    "weight false (best archive)": {**GO_REQUEST, "weight": False, "trainer_name": ""},
}


@dataclass(frozen=True)
class Figures:
    requests: int
    seconds: float
    latencies: list[float]
    reply_bytes: int
    server_cpu_seconds: float

    def line(self, name: str, clients: int) -> str:
        cuts = statistics.quantiles(self.latencies, n=100, method="inclusive")
        return (
            f"{name:<30} clients={clients}  n={self.requests:<5} "
            f"p50={cuts[49] * 1e3:5.2f} ms  p99={cuts[98] * 1e3:6.2f} ms  "
            f"{self.requests / self.seconds:5.0f} req/s  "
            f"server CPU {self.server_cpu_seconds / self.requests * 1e6:4.0f} us/req  "
            f"reply={self.reply_bytes} B"
        )


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def serve(model_path: Path, port: int) -> None:
    """The server process: the deployed entry point, bound to loopback."""
    sys.path.insert(0, str(ROOT))
    from kepler_model.settings import Settings
    from serving.model_server import run_model_server

    settings = Settings(
        model_path=model_path,
        model_server_host="127.0.0.1",
        model_server_port=port,
        initial_pipeline_url="",
    )
    run_model_server(settings)


def start_server(model_path: Path, port: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, __file__, "--serve", str(port), "--model-path", str(model_path)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit(f"server on port {port} not ready within 30 s (models at {model_path}?)")


def client_run(url: str, body: dict[str, Any], count: int) -> tuple[list[float], int]:
    latencies = []
    size = 0
    with httpx.Client(base_url=url, timeout=10) as client:
        for _ in range(count):
            started = time.perf_counter()
            reply = client.post("/model", json=body)
            latencies.append(time.perf_counter() - started)
            reply.raise_for_status()
            size = len(reply.content)
    return latencies, size


def measure(url: str, pid: int, body: dict[str, Any], clients: int, total: int) -> Figures:
    per_client = max(1, total // clients)
    client_run(url, body, 20)  # warm up: connections, catalogue, page cache
    cpu_before = cpu_seconds(pid)
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda _: client_run(url, body, per_client), range(clients)))
    seconds = time.perf_counter() - started
    cpu = cpu_seconds(pid) - cpu_before
    latencies = [t for run, _ in results for t in run]
    return Figures(len(latencies), seconds, latencies, results[0][1], cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="per scenario and level")
    parser.add_argument("--model-path", type=Path, default=DEFAULT_MODEL_PATH)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.model_path, args.serve)
        return

    port = free_port()
    server = start_server(args.model_path, port)
    url = f"http://127.0.0.1:{port}"
    try:
        print(f"model server on {url}, models from {args.model_path}")
        for name, body in SCENARIOS.items():
            for clients in (1, 8):
                figures = measure(url, server.pid, body, clients, args.requests)
                print(figures.line(name, clients))
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
