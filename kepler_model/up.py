"""``kepler-model up``: the whole platform in one process.

Trains on the bundled real Kepler dump when MODEL_PATH has no model yet, then runs the model
server, the train API and the estimator socket in one event loop until SIGINT or SIGTERM,
when all three stop together (requests in flight finish, the socket file is removed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import uvicorn

from estimator.server import EstimatorServer, SocketInUseError, remove_stale_socket
from kepler_model.settings import Settings
from serving.model_server import create_app
from serving.train_api import create_train_app
from storage.catalogue import scan

logger = logging.getLogger(__name__)

BUNDLED_DUMP = "kepler_workload_2023.json.gz"


def bundled_dump() -> Path:
    """The real 2023 Kepler workload dump shipped with the package."""
    return Path(str(resources.files("kepler_model") / "data" / BUNDLED_DUMP))


class AddressInUseError(OSError):
    """A port or socket that ``up`` would serve on is taken by another process."""


def check_addresses_free(settings: Settings) -> None:
    """Refuse to start, before training, when another process holds a port or the socket."""
    for name, host, port in (
        ("model server", settings.model_server_host, settings.model_server_port),
        ("train API", settings.train_api_host, settings.train_api_port),
    ):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as error:
                raise AddressInUseError(f"{name} port {host}:{port}: {error.strerror}") from None
    try:
        remove_stale_socket(settings.estimator_socket)
    except (SocketInUseError, FileExistsError) as error:
        raise AddressInUseError(f"estimator socket: {error}") from None


class SharedSignalServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to ``up``, which stops all services."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def ensure_models(settings: Settings, retrain: bool = False) -> None:
    """Train the default pipeline on the bundled dump unless models are already published."""
    catalogue = scan([settings.model_path])
    if catalogue.model_count and not retrain:
        logger.info(
            "%d models already published in %s; not training",
            catalogue.model_count,
            settings.model_path,
        )
        return
    from kepler_model.cli import print_report, run_training

    logger.info("training pipeline %s on the bundled dump", settings.default_pipeline)
    report = run_training(settings, bundled_dump(), settings.default_pipeline)
    print_report(report)


async def serve_all(settings: Settings) -> None:
    model_server = SharedSignalServer(
        uvicorn.Config(
            create_app(settings),
            host=settings.model_server_host,
            port=settings.model_server_port,
            log_level="info",
        )
    )
    train_api = SharedSignalServer(
        uvicorn.Config(
            create_train_app(settings),
            host=settings.train_api_host,
            port=settings.train_api_port,
            log_level="info",
        )
    )
    estimator = EstimatorServer(settings)
    await estimator.start()  # a taken socket fails here, before the HTTP servers start

    def stop_all() -> None:
        logger.info("stopping the model server, the train API and the estimator")
        model_server.should_exit = True
        train_api.should_exit = True
        estimator.request_stop()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop_all)
    logger.info(
        "model server on http://%s:%d, train API on http://%s:%d, estimator on %s",
        settings.model_server_host,
        settings.model_server_port,
        settings.train_api_host,
        settings.train_api_port,
        settings.estimator_socket,
    )
    await asyncio.gather(model_server.serve(), train_api.serve(), estimator.serve())


def run_up(settings: Settings, retrain: bool = False) -> None:
    check_addresses_free(settings)
    ensure_models(settings, retrain)
    asyncio.run(serve_all(settings))
