"""Fixtures shared by the whole suite.

One Prefect test harness (a temporary local API server) serves every flow test in the
session; starting it costs seconds, so it is started once and only when a test needs it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest
import uvicorn
from starlette.types import ASGIApp

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def workload_dump() -> Path:
    """The real 2023 Kepler workload dump bundled with the package."""
    return Path(str(resources.files("kepler_model") / "data" / "kepler_workload_2023.json.gz"))


@pytest.fixture(scope="session")
def idle_dump() -> Path:
    return DATA / "kepler_idle_2024.json.gz"


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def running_server(app: ASGIApp) -> Iterator[str]:
    """A real uvicorn server for ``app`` on a free loopback port; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
