"""The offline trainer API (``:8102``): ``POST /train`` runs offline-training, replies a zip.

The request body is streamed to a temporary file (gunzipped on the way when it is sent with
``Content-Encoding: gzip``), bounded in size after decompression. The body is then read once:
its small fields are validated and its dumps are copied, as text, to the files the flow reads
(serving.train_request), so the dump is never held as Python objects by the request itself.
Each request trains into its own temporary DuckDB file and publishes into MODEL_PATH, where the
model server picks the new version up. One pipeline trains at a time: a second request for a
pipeline already training gets 409; requests for different pipelines train side by side.
``GET /healthz`` lists the pipelines training now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import zlib
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import IO, Any

import anyio.to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from flows.api_server import stop_temporary_api_server
from flows.offline_training import offline_training
from flows.runners import make_task_runner
from kepler_model.settings import Settings
from serving.train_request import TrainJob, TrainRequestError, prepare_training
from storage.dumps import DumpFormatError
from storage.pipelines import zip_pipeline

logger = logging.getLogger(__name__)

INFLATE_BLOCK = 1 << 20


class BodyTooLargeError(TrainRequestError):
    status = 413


class UnsupportedEncodingError(TrainRequestError):
    status = 415


class PipelineBusyError(TrainRequestError):
    status = 409


class TrainingFailedError(TrainRequestError):
    """The flow could not use the data; ``run_id`` names its flow run."""

    def __init__(self, message: str, run_id: str) -> None:
        super().__init__(message)
        self.run_id = run_id


class BodyWriter:
    """Writes a request body to a file, inflating gzip, refusing more than ``limit`` bytes."""

    def __init__(self, out: IO[bytes], limit: int, gzipped: bool) -> None:
        self.out = out
        self.limit = limit
        self.written = 0
        self.inflater = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzipped else None

    def write(self, chunk: bytes) -> None:
        if self.inflater is None:
            self._keep(chunk)
            return
        data = chunk
        # Bounded steps: a small compressed chunk may inflate to gigabytes.
        while data:
            self._keep(self._inflate(data))
            data = self.inflater.unconsumed_tail
        if self.inflater.unused_data:
            raise TrainRequestError("body has data after the end of its gzip stream")

    def finish(self) -> None:
        if self.inflater is not None and not self.inflater.eof:
            raise TrainRequestError("gzip body is truncated")

    def _inflate(self, data: bytes) -> bytes:
        assert self.inflater is not None
        try:
            return self.inflater.decompress(data, INFLATE_BLOCK)
        except zlib.error as exc:
            raise TrainRequestError(f"body is not valid gzip: {exc}") from None

    def _keep(self, data: bytes) -> None:
        self.written += len(data)
        if self.written > self.limit:
            raise BodyTooLargeError(f"body larger than {self.limit} bytes")
        self.out.write(data)


async def receive_body(request: Request, target: Path, limit: int) -> None:
    """Stream the body to ``target``, gunzipping when asked, refusing more than ``limit``."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip"):
        raise UnsupportedEncodingError(f"Content-Encoding {encoding!r}: send gzip or plain JSON")
    gzipped = encoding == "gzip"
    declared = request.headers.get("content-length", "")
    if not gzipped and declared.isdigit() and int(declared) > limit:
        raise BodyTooLargeError(f"body of {declared} bytes is larger than {limit} bytes")
    with target.open("wb") as out:
        writer = BodyWriter(out, limit, gzipped)
        async for chunk in request.stream():
            writer.write(chunk)
        writer.finish()


def run_training(settings: Settings, job: TrainJob, folder: Path) -> tuple[dict[str, Any], str]:
    """Run the flow (blocking: called in a worker thread); its report and flow run id."""
    request = job.request
    runner = make_task_runner(settings.task_runner, settings.dask_address)
    state = offline_training.with_options(task_runner=runner)(
        input=str(job.workload),
        pipeline=request.name,
        energy_source=request.energy_source,
        abs_trainers=request.trainer.abs_trainers,
        dyn_trainers=request.trainer.dyn_trainers,
        isolator=request.trainer.isolator,
        isolator_args=request.trainer.isolator_args,
        idle=str(job.idle) if job.idle else None,
        model_path=str(settings.model_path),
        db_path=str(folder / "train.duckdb"),
        node_type=request.node_type,
        machine_spec=request.machine_spec,
        return_state=True,
    )
    run_id = str(state.state_details.flow_run_id)
    return flow_report(state, run_id), run_id


def flow_report(state: Any, run_id: str) -> dict[str, Any]:
    """The flow's report; data the flow could not use becomes a 400 naming the problem."""
    try:
        return dict(state.result())
    except DumpFormatError as exc:
        raise TrainingFailedError(f"prom_response: {exc}", run_id) from exc
    except (ValueError, LookupError) as exc:
        raise TrainingFailedError(f"training failed (flow run {run_id}): {exc}", run_id) from exc


async def train(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    locks: dict[str, asyncio.Lock] = request.app.state.locks
    with tempfile.TemporaryDirectory(prefix="kepler-train-") as tmp:
        folder = Path(tmp)
        body = folder / "body.json"
        await receive_body(request, body, settings.train_max_body_bytes)
        job = await anyio.to_thread.run_sync(prepare_training, body, folder)
        body.unlink()
        name = job.request.name
        lock = locks.setdefault(name, asyncio.Lock())
        if lock.locked():
            raise PipelineBusyError(f"pipeline {name} is already being trained")
        async with lock:
            size = job.workload.stat().st_size
            logger.info("training pipeline %s on a dump of %d bytes", name, size)
            report, run_id = await anyio.to_thread.run_sync(
                partial(run_training, settings, job, folder)
            )
    return await training_reply(name, report, run_id)


async def training_reply(name: str, report: dict[str, Any], run_id: str) -> Response:
    if not report.get("path"):
        return JSONResponse(
            {"error": "no model could be trained from this data", "report": report},
            status_code=422,
            headers={"X-Flow-Run-Id": run_id},
        )
    archive = await anyio.to_thread.run_sync(zip_pipeline, Path(report["path"]))
    return Response(
        archive,
        media_type="application/zip",
        headers={
            "Content-Disposition": f'attachment; filename="{name}.zip"',
            "X-Flow-Run-Id": run_id,
            "X-Pipeline-Version": str(report["version"]),
        },
    )


async def on_request_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TrainRequestError)
    headers = {"X-Flow-Run-Id": exc.run_id} if isinstance(exc, TrainingFailedError) else None
    return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=headers)


async def on_client_gone(request: Request, exc: Exception) -> Response:
    logger.info("POST /train: the client left before sending its whole body")
    return Response(status_code=400)


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code)


async def healthz(request: Request) -> Response:
    locks: dict[str, asyncio.Lock] = request.app.state.locks
    training = sorted(name for name, lock in locks.items() if lock.locked())
    return JSONResponse({"status": "ok", "training": training})


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    yield
    stop_temporary_api_server()


def create_train_app(settings: Settings) -> Starlette:
    app = Starlette(
        routes=[Route("/train", train, methods=["POST"]), Route("/healthz", healthz)],
        lifespan=lifespan,
        exception_handlers={
            TrainRequestError: on_request_error,
            HTTPException: on_http_error,
            ClientDisconnect: on_client_gone,
        },
    )
    app.state.settings = settings
    app.state.locks = {}
    return app
