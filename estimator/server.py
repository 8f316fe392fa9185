"""The estimator: a Unix socket server answering Kepler's power requests (SPEC section 7).

Each connection carries one request and gets one reply. Reading is asynchronous, so a slow or
silent client holds only its own connection. A request of bounded size for a model that is
already loaded and quick to evaluate is answered on the event loop: that is Kepler's usual
request, and handing it to a thread cost a fifth of its CPU time. Everything else (loading or
downloading a model, large requests, scikit-learn and XGBoost models) runs in a thread pool,
so the event loop keeps accepting and reading meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

import numpy as np

from estimator.evaluation import is_quick
from estimator.models import ModelProvider, core_ratio
from estimator.protocol import (
    KEPLER_READ_BYTES,
    EstimationReply,
    EstimationRequest,
    EstimatorError,
    RequestError,
    RequestFramer,
    parse_request,
)
from kepler_model.settings import Settings, load_settings
from modelling.machine_spec import discover_machine_spec
from modelling.power_model import PowerModel
from modelling.vocabulary import OutputType

logger = logging.getLogger(__name__)

DEFAULT_WORKERS = 8
READ_CHUNK = 64 * 1024
GRACE_SECONDS = 5.0
# Requests up to this size (about 1000 rows of three metrics) may be answered on the event
# loop; larger ones are parsed and evaluated in the thread pool.
INLINE_MAX_BYTES = 64 * 1024


class PredictionError(EstimatorError):
    """A model that failed on well-formed rows."""


class SocketInUseError(OSError):
    """Another process is listening on the estimator's socket path."""


def estimate(body: bytes, provider: ModelProvider, cpu_count: int) -> bytes:
    """The encoded reply to one complete request body; raises EstimatorError."""
    return estimate_request(parse_request(body), provider, cpu_count)


def estimate_request(request: EstimationRequest, provider: ModelProvider, cpu_count: int) -> bytes:
    return answer(request, provider.model_for(request.model_query()), cpu_count)


def answer(request: EstimationRequest, model: PowerModel, cpu_count: int) -> bytes:
    """The encoded reply of ``model`` to ``request``; raises EstimatorError."""
    ratio = core_ratio(model, cpu_count)
    try:
        powers = model.predict(request.rows_for(model.features))
        if request.output_type is OutputType.DYN_POWER:
            powers = without_idle_rows(powers, request.idle_rows(model.features))
    except RequestError as exc:
        raise RequestError(str(exc), ratio) from None
    except (ValueError, ArithmeticError) as exc:
        raise PredictionError(f"model {model.name} failed to predict: {exc}", ratio) from exc
    return EstimationReply.from_powers(powers, ratio).encode()


def without_idle_rows(powers: dict[str, np.ndarray], idle: np.ndarray) -> dict[str, np.ndarray]:
    """Dynamic power is what activity causes: a process or container whose counters are all
    zero draws none, whatever a model fitted on busier rows (trees, curves) would say."""
    if not idle.any():
        return powers
    return {component: np.where(idle, 0.0, watts) for component, watts in powers.items()}


def remove_stale_socket(path: Path) -> None:
    """Remove a socket file left by an estimator that died; never touch a live one."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(f"{path} exists and is not a socket; not replacing it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)
            logger.info("removed stale socket %s", path)
            return
        except TimeoutError:
            raise SocketInUseError(f"{path} has a listener too busy to accept") from None
    raise SocketInUseError(f"another process is listening on {path}")


class EstimatorServer:
    """Serves ``settings.estimator_socket`` until stopped.

    A request must arrive whole within ``estimator_read_timeout`` seconds of the connection
    and be at most ``estimator_max_request_bytes``; the reply must be taken within the same
    timeout.

    ``await start()`` binds and listens; ``await stop()`` stops accepting, lets requests in
    flight finish (up to ``grace_seconds``) and removes the socket file. ``await serve()`` does
    both around waiting for ``request_stop()``, which any thread or signal handler may call.
    """

    def __init__(
        self,
        settings: Settings,
        provider: ModelProvider | None = None,
        cpu_count: int | None = None,
        workers: int = DEFAULT_WORKERS,
        grace_seconds: float = GRACE_SECONDS,
    ) -> None:
        self.settings = settings
        self._owns_provider = provider is None
        # Published models of the node type closest to this machine are preferred.
        spec = discover_machine_spec() if settings.estimator_match_machine else None
        self.provider = provider or ModelProvider(settings, machine_spec=spec)
        self.cpu_count = cpu_count or os.cpu_count() or 1
        self._workers = workers
        self._grace = grace_seconds
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        self._stop_requested = asyncio.Event()
        self._socket_inode: int | None = None
        self._warned_reply_size = False
        self.requests = 0
        self.refused = 0

    @property
    def socket_path(self) -> Path:
        return self.settings.estimator_socket

    @property
    def serving(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        if self._server is not None:
            return
        path = self.socket_path
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_socket(path)
        self._loop = asyncio.get_running_loop()
        self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="estimator")
        self._server = await asyncio.start_unix_server(self._handle, path=str(path))
        self._socket_inode = path.lstat().st_ino
        logger.info(
            "estimator listening on %s: %d worker threads, %d CPUs, requests up to %d bytes",
            path,
            self._workers,
            self.cpu_count,
            self.settings.estimator_max_request_bytes,
        )

    def request_stop(self) -> None:
        """Ask ``serve()`` to stop; safe from any thread and from signal handlers."""
        if self._loop is None:
            self._stop_requested.set()
        else:
            self._loop.call_soon_threadsafe(self._stop_requested.set)

    async def serve(self) -> None:
        """Start (if needed) and serve until ``request_stop()``; then stop cleanly."""
        await self.start()
        try:
            await self._stop_requested.wait()
        finally:
            await self.stop()

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        await self._finish_in_flight()
        await server.wait_closed()
        self._remove_socket()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._owns_provider:
            self.provider.close()
        self._stop_requested.set()
        logger.info(
            "estimator on %s stopped after %d requests (%d refused)",
            self.socket_path,
            self.requests,
            self.refused,
        )

    async def __aenter__(self) -> EstimatorServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _finish_in_flight(self) -> None:
        if not self._in_flight:
            return
        _, pending = await asyncio.wait(set(self._in_flight), timeout=self._grace)
        if pending:
            logger.warning(
                "cancelling %d connections still open after %g s", len(pending), self._grace
            )
            for task in pending:
                task.cancel()
            await asyncio.wait(pending)

    def _remove_socket(self) -> None:
        path = self.socket_path
        try:
            inode = path.lstat().st_ino
        except FileNotFoundError:
            logger.info("socket %s was already removed", path)
            return
        if inode == self._socket_inode:
            path.unlink(missing_ok=True)
        else:
            logger.warning("socket %s now belongs to another process; left in place", path)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._in_flight.add(task)
        try:
            reply = await self._reply_to(reader)
            await self._send(writer, reply)
        except (ConnectionError, TimeoutError) as exc:
            logger.debug("client left before its reply was written: %r", exc)
        finally:
            if task is not None:
                self._in_flight.discard(task)
            writer.close()

    async def _reply_to(self, reader: asyncio.StreamReader) -> bytes:
        """The reply bytes; every EstimatorError, while reading or estimating, ends here."""
        self.requests += 1
        try:
            return await self._estimate(await self._read_request(reader))
        except EstimatorError as exc:
            self.refused += 1
            logger.debug("refused a request: %s", exc)
            return EstimationReply.from_error(exc).encode()
        except Exception as exc:
            # A defect of ours, not of the request: Kepler still gets a reply it can parse.
            self.refused += 1
            logger.exception("failed to answer a request")
            failure = EstimatorError(f"estimator failed: {type(exc).__name__}: {exc}")
            return EstimationReply.from_error(failure).encode()

    async def _estimate(self, body: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        if len(body) > INLINE_MAX_BYTES:
            return await loop.run_in_executor(
                self._pool, estimate, body, self.provider, self.cpu_count
            )
        request = parse_request(body)
        model = self.provider.cached(request.model_query())
        if model is not None and is_quick(model):
            return answer(request, model, self.cpu_count)
        return await loop.run_in_executor(
            self._pool, estimate_request, request, self.provider, self.cpu_count
        )

    async def _read_request(self, reader: asyncio.StreamReader) -> bytes:
        framer = RequestFramer(self.settings.estimator_max_request_bytes)
        timeout = self.settings.estimator_read_timeout
        body = None
        try:
            async with asyncio.timeout(timeout):
                while body is None:
                    body = framer.feed(await reader.read(READ_CHUNK))
        except TimeoutError:
            raise RequestError(
                f"no complete JSON object within {timeout:g} s ({framer.received} bytes arrived)"
            ) from None
        return body

    async def _send(self, writer: asyncio.StreamWriter, reply: bytes) -> None:
        if len(reply) > KEPLER_READ_BYTES and not self._warned_reply_size:
            self._warned_reply_size = True
            logger.warning(
                "a reply of %d bytes exceeds the %d bytes Kepler reads at once; "
                "Kepler cannot decode it (reported once)",
                len(reply),
                KEPLER_READ_BYTES,
            )
        writer.write(reply)
        async with asyncio.timeout(self.settings.estimator_read_timeout):
            await writer.drain()


def run_estimator(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT; then finish requests in flight and remove the socket."""
    asyncio.run(_serve_until_signalled(settings))


async def _serve_until_signalled(settings: Settings) -> None:
    server = EstimatorServer(settings)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, server.request_stop)
    await server.serve()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    run_estimator(load_settings())
