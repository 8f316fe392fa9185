"""The offline trainer API (``:8102``): ``POST /train`` runs offline-training, replies a zip.

The request body is streamed to a temporary file (gunzipped on the way when it is sent with
``Content-Encoding: gzip``) and bounded in size, so a large dump is never held twice as raw
bytes. Each request trains into its own temporary DuckDB file and publishes into MODEL_PATH,
where the model server picks the new version up. One pipeline trains at a time: a second
request for a pipeline already training gets 409.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import zlib
from functools import partial
from pathlib import Path
from typing import Any

import anyio.to_thread
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from flows.offline_training import DEFAULT_TRAINERS, offline_training
from flows.runners import make_task_runner
from kepler_model.settings import Settings
from modelling.isolate import UnknownIsolatorError, make_isolator
from modelling.trainers import TRAINERS
from modelling.vocabulary import normalise_source
from storage.dumps import DumpFormatError
from storage.pipelines import check_pipeline_name, zip_pipeline

logger = logging.getLogger(__name__)


class TrainerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    abs_trainers: list[str] = Field(default_factory=lambda: list(DEFAULT_TRAINERS))
    dyn_trainers: list[str] = Field(default_factory=lambda: list(DEFAULT_TRAINERS))
    isolator: str = "MinIdleIsolator"
    isolator_args: dict[str, Any] = Field(default_factory=dict)
    idle_prom_response: dict[str, Any] | None = None

    @field_validator("abs_trainers", "dyn_trainers")
    @classmethod
    def known_trainers(cls, names: list[str]) -> list[str]:
        unknown = [n for n in names if n not in TRAINERS]
        if unknown:
            raise ValueError(f"unknown trainers {unknown}; available: {sorted(TRAINERS)}")
        return names

    @field_validator("isolator")
    @classmethod
    def known_isolator(cls, name: str) -> str:
        try:
            make_isolator(name)
        except UnknownIsolatorError as exc:
            raise ValueError(str(exc)) from None
        except TypeError:
            pass  # known, but needs isolator_args; checked when the flow builds it
        return name


class TrainRequest(BaseModel):
    """SPEC section 9; ``prome_response`` is the seed's spelling of ``prom_response``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str
    energy_source: str = "rapl-sysfs"
    trainer: TrainerSpec = Field(default_factory=TrainerSpec)
    prom_response: dict[str, Any]
    node_type: int = 0
    machine_spec: dict[str, Any] | None = None

    @field_validator("name")
    @classmethod
    def plain_name(cls, name: str) -> str:
        return check_pipeline_name(name)

    @field_validator("energy_source")
    @classmethod
    def known_source(cls, source: str) -> str:
        return normalise_source(source)

    @field_validator("prom_response")
    @classmethod
    def non_empty(cls, dump: dict[str, Any]) -> dict[str, Any]:
        if not dump:
            raise ValueError("prom_response holds no metrics")
        return dump


async def receive_body(request: Request, target: Path, limit: int) -> None:
    """Stream the body to ``target``, gunzipping when asked, refusing more than ``limit``."""
    gzipped = request.headers.get("content-encoding", "").lower() == "gzip"
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzipped else None
    written = 0
    with target.open("wb") as out:
        async for chunk in request.stream():
            try:
                data = inflater.decompress(chunk) if inflater else chunk
            except zlib.error as exc:
                raise HTTPException(400, f"body is not valid gzip: {exc}") from exc
            written += len(data)
            if written > limit:
                raise HTTPException(413, f"body larger than {limit} bytes")
            out.write(data)
        if inflater and not inflater.eof:
            raise HTTPException(400, "gzip body is truncated")


def parse_request(path: Path) -> TrainRequest:
    try:
        with path.open("rb") as handle:
            body = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HTTPException(400, f"body is not valid JSON: {exc}") from exc
    if isinstance(body, dict) and "prome_response" in body and "prom_response" not in body:
        body["prom_response"] = body.pop("prome_response")
    try:
        return TrainRequest.model_validate(body)
    except ValidationError as exc:
        details = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        raise HTTPException(422, details) from exc


def _write_dump(dump: dict[str, Any], path: Path) -> str:
    with path.open("w") as out:
        json.dump(dump, out)
    return str(path)


def _run_training(
    settings: Settings, request: TrainRequest, folder: Path
) -> tuple[dict[str, Any], str]:
    """Run the flow (blocking: called in a worker thread); its report and flow run id."""
    workload = _write_dump(request.prom_response, folder / "workload.json")
    idle_dump = request.trainer.idle_prom_response
    idle = _write_dump(idle_dump, folder / "idle.json") if idle_dump else None
    runner = make_task_runner(settings.task_runner, settings.dask_address)
    state = offline_training.with_options(task_runner=runner)(
        input=workload,
        pipeline=request.name,
        energy_source=request.energy_source,
        abs_trainers=request.trainer.abs_trainers,
        dyn_trainers=request.trainer.dyn_trainers,
        isolator=request.trainer.isolator,
        isolator_args=request.trainer.isolator_args,
        idle=idle,
        model_path=str(settings.model_path),
        db_path=str(folder / "train.duckdb"),
        node_type=request.node_type,
        machine_spec=request.machine_spec,
        return_state=True,
    )
    run_id = str(state.state_details.flow_run_id)
    return _flow_report(state, run_id), run_id


async def train(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    locks: dict[str, asyncio.Lock] = request.app.state.locks
    with tempfile.TemporaryDirectory(prefix="kepler-train-") as tmp:
        folder = Path(tmp)
        await receive_body(request, folder / "body.json", settings.train_max_body_bytes)
        body = await anyio.to_thread.run_sync(parse_request, folder / "body.json")
        (folder / "body.json").unlink()
        lock = locks.setdefault(body.name, asyncio.Lock())
        if lock.locked():
            raise HTTPException(409, f"pipeline {body.name} is already being trained")
        async with lock:
            report, run_id = await anyio.to_thread.run_sync(
                partial(_run_training, settings, body, folder)
            )
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
            "Content-Disposition": f'attachment; filename="{body.name}.zip"',
            "X-Flow-Run-Id": run_id,
            "X-Pipeline-Version": str(report["version"]),
        },
    )


def _flow_report(state: Any, run_id: str) -> dict[str, Any]:
    """The flow's report; data the flow could not use becomes a 400 naming the problem."""
    try:
        return dict(state.result())
    except DumpFormatError as exc:
        raise HTTPException(400, f"prom_response: {exc}") from exc
    except (ValueError, LookupError) as exc:
        raise HTTPException(400, f"training failed (flow run {run_id}): {exc}") from exc


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code)


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def create_train_app(settings: Settings) -> Starlette:
    app = Starlette(
        routes=[Route("/train", train, methods=["POST"]), Route("/healthz", healthz)],
        exception_handlers={HTTPException: http_error},
    )
    app.state.settings = settings
    app.state.locks = {}
    return app
