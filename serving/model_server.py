"""The model server (SPEC section 6): Kepler asks it for the best published model.

Routes: ``POST /model``, ``GET /best-models``, ``GET /pipelines``,
``GET /models/{pipeline}/{source}/{output_type}/{group}/{name}``, ``GET /healthz``,
``GET /readyz``, ``GET /metrics`` (serving.metrics) and ``GET /openapi.json`` (serving.openapi).
Pipelines come from ``MODEL_PATH`` and from ``INITIAL_PIPELINE_URL``; the catalogue notices new
publishes, rollbacks and prunes without a restart.

Errors are raised as typed exceptions and turned into JSON replies by the handlers registered in
``create_app`` and nowhere else. Catalogue and file work runs in worker threads so that a
catalogue rebuild never stalls the event loop.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio.to_thread
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kepler_model.settings import Settings
from modelling.vocabulary import OutputType, UnknownSourceError
from serving.initial_pipelines import load_initial_pipelines
from serving.metrics import MetricsMiddleware, ServerMetrics, model_counts
from serving.openapi import openapi_schema
from serving.requests import (
    BestModelsQuery,
    RequestError,
    name_fields,
    parse_best_models_query,
    parse_model_request,
    read_body,
)
from serving.responses import (
    HealthReply,
    ModelReply,
    NoModelReply,
    NotFoundReply,
    PipelineReply,
    PipelinesReply,
    ReadyReply,
)
from storage.catalogue import (
    Catalogue,
    FilterError,
    LiveCatalogue,
    ModelEntry,
    NoModelError,
    Pipeline,
    Selection,
)
from storage.pipelines import current_version, list_versions

logger = logging.getLogger(__name__)


class ModelFileMissingError(RuntimeError):
    """A selected model's archive vanished from disk (a pipeline was pruned meanwhile)."""


class ModelNotFoundError(LookupError):
    """``GET /models/...`` names a model that is not published; ``available`` says what is."""

    def __init__(self, message: str, available: list[str]) -> None:
        super().__init__(message)
        self.available = available


class ServedCatalogue:
    """The live catalogue, checked by one worker thread at a time.

    ``LiveCatalogue`` is not thread-safe; without the lock, concurrent requests right after a
    publish could each start the same rebuild. ``recent`` hands out the last snapshot without
    touching the disk while it is younger than the live catalogue's check interval, so that
    ``POST /model`` can answer on the event loop instead of paying a thread hop per request.
    """

    def __init__(self, live: LiveCatalogue) -> None:
        self.live = live
        self._lock = threading.Lock()
        self._latest: Catalogue | None = None
        self._checked = float("-inf")

    def current(self) -> Catalogue:
        with self._lock:
            catalogue = self.live.current()
            self._latest, self._checked = catalogue, time.monotonic()
            return catalogue

    def recent(self) -> Catalogue | None:
        """The last snapshot if it was checked within the interval, else None (check it)."""
        if time.monotonic() - self._checked < self.live.min_interval:
            return self._latest
        return None


def _served(request: Request) -> ServedCatalogue:
    served: ServedCatalogue = request.app.state.catalogue
    return served


async def post_model(request: Request) -> Response:
    """Selection is CPU work on an immutable snapshot, done on the event loop; only disk reads
    (a due catalogue check, an archive) go to a worker thread."""
    limit: int = request.app.state.max_body_bytes
    body = await read_body(request.stream(), request.headers.get("content-length"), limit)
    model_request = parse_model_request(body)
    served = _served(request)
    catalogue = served.recent()
    if catalogue is None:
        catalogue = await run_in_threadpool(served.current)
    selection = catalogue.select(model_request.to_query())
    entry = selection.entry
    headers = selection_headers(selection)
    if model_request.ignored_fields:
        headers["X-Ignored-Fields"] = name_fields(model_request.ignored_fields)
    logger.debug("POST /model %s -> %s/%s", model_request, entry.pipeline, entry.name)
    if model_request.weight:
        return JSONResponse(weight_body(catalogue, entry), headers=headers)
    archive = await run_in_threadpool(read_archive_bytes, entry)
    headers["Content-Disposition"] = f'attachment; filename="{entry.name}.zip"'
    return Response(archive, media_type="application/zip", headers=headers)


def selection_headers(selection: Selection) -> dict[str, str]:
    entry = selection.entry
    headers = {
        "X-Model-Name": entry.name,
        "X-Pipeline": entry.pipeline,
        "X-Source": entry.source,
        "X-Output-Type": entry.output_type,
        "X-Feature-Group": entry.feature_group,
        "X-Trainer": entry.trainer,
        "X-Node-Type": str(entry.node_type),
        "X-Node-Type-Matched": "true" if selection.node_type_matched else "false",
    }
    if selection.match is not None:
        # How the node type fits the request's machine_spec (SPEC section 8); headers, because
        # Kepler reads the weight JSON's top level as it is published.
        headers["X-Node-Type-Similarity"] = f"{selection.match.similarity:.4f}"
        headers["X-Node-Type-Uncertainty"] = f"{selection.match.uncertainty:.4f}"
        if selection.match.runner_up is not None:
            headers["X-Node-Type-Runner-Up"] = str(selection.match.runner_up)
    return headers


def weight_body(catalogue: Catalogue, entry: ModelEntry) -> dict[str, Any]:
    """Kepler's weight JSON plus ``model_name``, ``machine_spec`` and the error key's value."""
    assert entry.weights is not None
    body = dict(entry.weights)
    body["model_name"] = entry.name
    spec = machine_spec(catalogue, entry)
    if spec:
        body["machine_spec"] = spec
    error = entry.metadata.get(catalogue.error_key)
    if error is not None:
        body[catalogue.error_key] = error
    return body


def machine_spec(catalogue: Catalogue, entry: ModelEntry) -> dict[str, Any] | None:
    """The model's own spec, else the attrs of its node type in the pipeline's index."""
    spec = entry.metadata.get("machine_spec")
    if isinstance(spec, dict) and spec:
        return spec
    pipeline = catalogue.pipelines.get(entry.pipeline)
    node = pipeline.node_type_index.get(str(entry.node_type)) if pipeline else None
    attrs = node.get("attrs") if isinstance(node, dict) else None
    return attrs if isinstance(attrs, dict) else None


def read_archive_bytes(entry: ModelEntry) -> bytes:
    """The archive exactly as published; old pickled archives are passed on, never loaded."""
    try:
        return entry.archive.read_bytes()
    except OSError as exc:
        raise ModelFileMissingError(f"archive of {entry.name} is unavailable: {exc}") from exc


async def get_best_models(request: Request) -> Response:
    query = parse_best_models_query(request.query_params)
    catalogue = await run_in_threadpool(_served(request).current)
    return JSONResponse(best_models_body(catalogue, query))


def best_models_body(catalogue: Catalogue, query: BestModelsQuery) -> dict[str, Any]:
    """``{output type: {group: model name}}``, every asked output type present, maybe empty."""
    output_type = query.output_type.value if query.output_type else None
    found = catalogue.best_models(
        query.source, output_type, query.feature_group, query.node_type, query.filter
    )
    asked = [query.output_type] if query.output_type else list(OutputType)
    return {o.value: found.get(o.value, {}) for o in asked}


async def get_pipelines(request: Request) -> Response:
    catalogue = await run_in_threadpool(_served(request).current)
    reply = await run_in_threadpool(pipelines_reply, catalogue)
    return JSONResponse(reply.model_dump(mode="json"))


def pipelines_reply(catalogue: Catalogue) -> PipelinesReply:
    """Every pipeline by name; reading the versions on disk is why this runs in a thread."""
    names = sorted(catalogue.pipelines)
    return PipelinesReply(pipelines=[pipeline_summary(catalogue.pipelines[n]) for n in names])


def pipeline_summary(pipeline: Pipeline) -> PipelineReply:
    counts: dict[str, dict[str, int]] = {}
    for (source, output_type), count in model_counts(pipeline).items():
        counts.setdefault(source, {})[output_type] = count
    version, versions = pipeline_versions(pipeline)
    return PipelineReply(
        name=pipeline.name,
        version=version,
        versions=versions,
        metadata=pipeline.metadata,
        node_types=pipeline.node_type_index,
        model_count=len(pipeline.models),
        models=counts,
    )


def pipeline_versions(pipeline: Pipeline) -> tuple[int | None, list[int]]:
    """The version served and those kept; an unversioned pipeline reports its metadata's."""
    folder = pipeline.path
    current = current_version(folder.parent, folder.name)
    if current is None:
        declared = pipeline.metadata.get("version")
        current = declared if isinstance(declared, int) and not isinstance(declared, bool) else None
    return current, list_versions(folder.parent, folder.name)


async def get_model(request: Request) -> Response:
    catalogue = await run_in_threadpool(_served(request).current)
    entry = find_model(catalogue, request.path_params)
    reply = await run_in_threadpool(model_summary, catalogue, entry)
    return JSONResponse(reply.model_dump(mode="json"))


def find_model(catalogue: Catalogue, where: dict[str, str]) -> ModelEntry:
    """The model at ``pipeline/source/output_type/group/name``, else an error naming those that
    exist (the pipeline's models, or every pipeline when the pipeline itself is unknown)."""
    pipeline = catalogue.pipelines.get(where["pipeline"])
    if pipeline is None:
        message = f"no pipeline {where['pipeline']!r}"
        raise ModelNotFoundError(message, sorted(catalogue.pipelines))
    wanted = (where["source"], where["output_type"], where["group"], where["name"])
    places = {(e.source, e.output_type, e.feature_group, e.name): e for e in pipeline.models}
    if wanted in places:
        return places[wanted]
    message = f"pipeline {pipeline.name} has no model {'/'.join(wanted)}"
    raise ModelNotFoundError(message, sorted("/".join(place) for place in places))


def model_summary(catalogue: Catalogue, entry: ModelEntry) -> ModelReply:
    try:
        size: int | None = entry.archive.stat().st_size
    except OSError:
        size = None
    return ModelReply(
        pipeline=entry.pipeline,
        pipeline_version=pipeline_versions(catalogue.pipelines[entry.pipeline])[0],
        source=entry.source,
        output_type=entry.output_type,
        feature_group=entry.feature_group,
        model_name=entry.name,
        trainer=entry.trainer,
        node_type=entry.node_type,
        features=list(entry.features),
        weight_capable=entry.weights is not None,
        archive_bytes=size,
        metadata=entry.metadata,
    )


async def get_healthz(request: Request) -> Response:
    return JSONResponse(HealthReply().model_dump())


async def get_readyz(request: Request) -> Response:
    catalogue = await run_in_threadpool(_served(request).current)
    pipelines, models = len(catalogue.pipelines), catalogue.model_count
    if not pipelines:
        reason = "no pipeline loaded"
        reply = ReadyReply(status="not ready", pipelines=0, models=models, reason=reason)
        return JSONResponse(reply.model_dump(exclude_none=True), 503)
    reply = ReadyReply(status="ready", pipelines=pipelines, models=models)
    return JSONResponse(reply.model_dump(exclude_none=True))


async def get_metrics(request: Request) -> Response:
    metrics: ServerMetrics = request.app.state.metrics
    text = await run_in_threadpool(metrics.render)
    return Response(text, media_type=CONTENT_TYPE_LATEST)


async def get_openapi(request: Request) -> Response:
    return JSONResponse(request.app.state.openapi)


async def on_request_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestError)
    return JSONResponse(exc.body(), exc.status)


async def on_bad_value(request: Request, exc: Exception) -> Response:
    """Unknown energy source, malformed filter: the client's words, not ours."""
    return JSONResponse({"error": str(exc)}, 400)


async def on_no_model(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, NoModelError)
    logger.info("no model for %s", exc.searched)
    catalogue = await run_in_threadpool(_served(request).current)
    reply = NoModelReply(
        error=str(exc),
        searched=exc.searched,
        available=exc.available,
        pipelines=sorted(catalogue.pipelines),
    )
    return JSONResponse(reply.model_dump(mode="json"), 404)


async def on_unknown_model(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ModelNotFoundError)
    reply = NotFoundReply(error=str(exc), available=exc.available)
    return JSONResponse(reply.model_dump(), 404)


async def on_missing_file(request: Request, exc: Exception) -> Response:
    logger.warning("%s", exc)
    return JSONResponse({"error": str(exc)}, 503, headers={"Retry-After": "1"})


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, exc.status_code, headers=exc.headers)


async def on_client_gone(request: Request, exc: Exception) -> Response:
    logger.info(
        "%s %s: the client left before sending its whole body", request.method, request.url.path
    )
    return Response(status_code=400)


async def on_server_error(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": "internal server error"}, 500)


def exception_handlers() -> dict[Any, Callable[[Request, Exception], Any]]:
    """The one place where raised errors become HTTP replies."""
    return {
        RequestError: on_request_error,
        UnknownSourceError: on_bad_value,
        FilterError: on_bad_value,
        NoModelError: on_no_model,
        ModelNotFoundError: on_unknown_model,
        ModelFileMissingError: on_missing_file,
        HTTPException: on_http_error,
        ClientDisconnect: on_client_gone,
        500: on_server_error,
    }


def unpack_initial_pipelines(settings: Settings, given: LiveCatalogue | None) -> Path | None:
    """A scratch folder holding the INITIAL_PIPELINE_URL pipelines; None when there are none."""
    if not settings.initial_pipeline_url.strip():
        return None
    if given is not None:
        logger.warning("INITIAL_PIPELINE_URL ignored: the server was given its catalogue")
        return None
    scratch = Path(tempfile.mkdtemp(prefix="kepler-initial-pipelines-"))
    load_initial_pipelines(settings.initial_pipeline_url, scratch)
    return scratch


def open_catalogue(
    settings: Settings, scratch: Path | None, given: LiveCatalogue | None
) -> LiveCatalogue:
    """The given catalogue, or one over MODEL_PATH and the unpacked initial pipelines."""
    if given is not None:
        return given
    paths = [settings.model_path] + ([scratch] if scratch is not None else [])
    return LiveCatalogue(paths, settings.default_pipeline, settings.error_key)


def make_lifespan(settings: Settings, given: LiveCatalogue | None) -> Callable[[Starlette], Any]:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        scratch = await anyio.to_thread.run_sync(unpack_initial_pipelines, settings, given)
        try:
            live = await anyio.to_thread.run_sync(open_catalogue, settings, scratch, given)
            served = ServedCatalogue(live)
            app.state.catalogue = served
            app.state.metrics.catalogue.source = served.current
            catalogue = await anyio.to_thread.run_sync(served.current)
            logger.info(
                "model server ready with %d pipelines, %d models from %s",
                len(catalogue.pipelines),
                catalogue.model_count,
                ", ".join(str(p) for p in live.model_paths),
            )
            yield
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)

    return lifespan


def create_app(
    settings: Settings,
    catalogue: LiveCatalogue | None = None,
    *,
    max_body_bytes: int | None = None,
) -> Starlette:
    """The model server app; nothing is read from disk until the app starts.

    Without ``catalogue``, the app serves ``settings.model_path`` plus the pipelines named by
    ``settings.initial_pipeline_url``; a given catalogue is served as it is.
    """
    metrics = ServerMetrics(settings.error_key)
    routes = [
        Route("/model", post_model, methods=["POST"]),
        Route("/best-models", get_best_models, methods=["GET"]),
        Route("/pipelines", get_pipelines, methods=["GET"]),
        Route(
            "/models/{pipeline}/{source}/{output_type}/{group}/{name}",
            get_model,
            methods=["GET"],
        ),
        Route("/healthz", get_healthz, methods=["GET"]),
        Route("/readyz", get_readyz, methods=["GET"]),
        Route("/metrics", get_metrics, methods=["GET"]),
        Route("/openapi.json", get_openapi, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(MetricsMiddleware, metrics=metrics)],
        exception_handlers=exception_handlers(),
        lifespan=make_lifespan(settings, catalogue),
    )
    app.state.metrics = metrics
    app.state.max_body_bytes = max_body_bytes or settings.model_server_max_body_bytes
    app.state.openapi = openapi_schema()
    return app


def run_model_server(settings: Settings) -> None:
    """Serve on ``MODEL_SERVER_HOST:MODEL_SERVER_PORT`` until interrupted."""
    config = uvicorn.Config(
        create_app(settings),
        host=settings.model_server_host,
        port=settings.model_server_port,
        proxy_headers=False,
        # An access log line is a large share of each answer's CPU; /metrics counts requests.
        access_log=False,
    )
    uvicorn.Server(config).run()
