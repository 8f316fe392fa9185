"""The model server (SPEC section 6): Kepler asks it for the best published model.

Routes: ``POST /model``, ``GET /best-models``, ``GET /pipelines``, ``GET /healthz``,
``GET /readyz``, ``GET /metrics`` and ``GET /openapi.json``. Pipelines come from ``MODEL_PATH``
and from ``INITIAL_PIPELINE_URL``; the catalogue notices new publishes without a restart.

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
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio.to_thread
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kepler_model.settings import Settings
from modelling.vocabulary import OutputType, UnknownSourceError
from serving.initial_pipelines import load_initial_pipelines
from serving.requests import (
    BestModelsQuery,
    ModelRequest,
    RequestError,
    parse_best_models_query,
    parse_model_request,
    read_body,
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

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ModelFileMissingError(RuntimeError):
    """A selected model's archive vanished from disk (a pipeline was pruned meanwhile)."""


class ServedCatalogue:
    """The live catalogue, checked by one worker thread at a time.

    ``LiveCatalogue`` is not thread-safe; without the lock, concurrent requests right after a
    publish could each start the same rebuild.
    """

    def __init__(self, live: LiveCatalogue) -> None:
        self.live = live
        self._lock = threading.Lock()

    def current(self) -> Catalogue:
        with self._lock:
            return self.live.current()


class CatalogueCollector:
    """Prometheus view of what is loaded: pipelines, model counts, each model's error."""

    def __init__(self, error_key: str) -> None:
        self.error_key = error_key
        self.source: Callable[[], Catalogue] | None = None

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        if self.source is None:
            return
        catalogue = self.source()
        pipelines = GaugeMetricFamily(
            "kepler_model_server_pipelines_loaded", "Pipelines the server can serve from"
        )
        pipelines.add_metric([], len(catalogue.pipelines))
        yield pipelines
        yield self._model_counts(catalogue)
        yield self._model_errors(catalogue)

    def _model_counts(self, catalogue: Catalogue) -> Metric:
        family = GaugeMetricFamily(
            "kepler_model_server_models_loaded",
            "Published models by pipeline, energy source and output type",
            labels=["pipeline", "source", "output_type"],
        )
        for pipeline in catalogue.pipelines.values():
            for (source, output_type), count in model_counts(pipeline).items():
                family.add_metric([pipeline.name, source, output_type], count)
        return family

    def _model_errors(self, catalogue: Catalogue) -> Metric:
        family = GaugeMetricFamily(
            "kepler_model_server_model_error",
            "Each published model's error by the configured error key (ERROR_KEY)",
            labels=["pipeline", "source", "output_type", "feature_group", "model", "key"],
        )
        for pipeline in catalogue.pipelines.values():
            for entry in pipeline.models:
                value = entry.metadata.get(self.error_key)
                if isinstance(value, int | float):
                    labels = [entry.pipeline, entry.source, entry.output_type]
                    labels += [entry.feature_group, entry.name, self.error_key]
                    family.add_metric(labels, float(value))
        return family


class ServerMetrics:
    """One registry per app, so that several apps in one process never share counters."""

    def __init__(self, error_key: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["route", "method", "status"]
        self.requests = Counter(
            "kepler_model_server_requests",
            "HTTP requests answered",
            labels,
            registry=self.registry,
        )
        self.latency = Histogram(
            "kepler_model_server_request_duration_seconds",
            "Time to answer an HTTP request",
            labels,
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self.catalogue = CatalogueCollector(error_key)
        self.registry.register(self.catalogue)

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method, str(status)).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts and times every HTTP request by route template (not raw path) and status."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.observe(route, scope["method"], status, time.perf_counter() - started)


def _served(request: Request) -> ServedCatalogue:
    served: ServedCatalogue = request.app.state.catalogue
    return served


async def post_model(request: Request) -> Response:
    limit: int = request.app.state.max_body_bytes
    body = await read_body(request.stream(), request.headers.get("content-length"), limit)
    model_request = parse_model_request(body)
    return await run_in_threadpool(model_reply, _served(request), model_request)


def model_reply(served: ServedCatalogue, model_request: ModelRequest) -> Response:
    """The selected model as weight JSON or as its archive, selection info in headers."""
    query = model_request.to_query()
    catalogue = served.current()
    selection = catalogue.select(query)
    entry = selection.entry
    headers = selection_headers(selection)
    logger.debug("POST /model %s -> %s/%s", query, entry.pipeline, entry.name)
    if query.weight:
        return JSONResponse(weight_body(catalogue, entry), headers=headers)
    headers["Content-Disposition"] = f'attachment; filename="{entry.name}.zip"'
    return Response(read_archive_bytes(entry), media_type="application/zip", headers=headers)


def selection_headers(selection: Selection) -> dict[str, str]:
    entry = selection.entry
    return {
        "X-Model-Name": entry.name,
        "X-Pipeline": entry.pipeline,
        "X-Source": entry.source,
        "X-Output-Type": entry.output_type,
        "X-Feature-Group": entry.feature_group,
        "X-Trainer": entry.trainer,
        "X-Node-Type": str(entry.node_type),
        "X-Node-Type-Matched": "true" if selection.node_type_matched else "false",
    }


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
    pipelines = [pipeline_summary(catalogue.pipelines[n]) for n in sorted(catalogue.pipelines)]
    return JSONResponse({"pipelines": pipelines})


def pipeline_summary(pipeline: Pipeline) -> dict[str, Any]:
    counts: dict[str, dict[str, int]] = {}
    for (source, output_type), count in model_counts(pipeline).items():
        counts.setdefault(source, {})[output_type] = count
    return {
        "name": pipeline.name,
        "metadata": pipeline.metadata,
        "node_types": pipeline.node_type_index,
        "model_count": len(pipeline.models),
        "models": counts,
    }


def model_counts(pipeline: Pipeline) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    for entry in pipeline.models:
        key = (entry.source, entry.output_type)
        counts[key] = counts.get(key, 0) + 1
    return counts


async def get_healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def get_readyz(request: Request) -> Response:
    catalogue = await run_in_threadpool(_served(request).current)
    body = {"pipelines": len(catalogue.pipelines), "models": catalogue.model_count}
    if not catalogue.pipelines:
        return JSONResponse({"status": "not ready", **body, "reason": "no pipeline loaded"}, 503)
    return JSONResponse({"status": "ready", **body})


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
    body = {"error": str(exc), "searched": exc.searched, "available": exc.available}
    return JSONResponse(body, 404)


async def on_missing_file(request: Request, exc: Exception) -> Response:
    logger.warning("%s", exc)
    return JSONResponse({"error": str(exc)}, 503, headers={"Retry-After": "1"})


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, exc.status_code, headers=exc.headers)


async def on_server_error(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": "internal server error"}, 500)


def exception_handlers() -> dict[Any, Callable[[Request, Exception], Any]]:
    """The one place where raised errors become HTTP replies."""
    return {
        RequestError: on_request_error,
        UnknownSourceError: on_bad_value,
        FilterError: on_bad_value,
        NoModelError: on_no_model,
        ModelFileMissingError: on_missing_file,
        HTTPException: on_http_error,
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
    )
    uvicorn.Server(config).run()


def openapi_schema() -> dict[str, Any]:
    """A hand-written OpenAPI 3.1 description; request bodies come from the pydantic models."""
    ref = "#/components/schemas/{model}"
    request_schema = ModelRequest.model_json_schema(ref_template=ref)
    schemas = {"ModelRequest": request_schema, **request_schema.pop("$defs", {})}
    schemas["Error"] = {
        "type": "object",
        "properties": {"error": {"type": "string"}},
        "required": ["error"],
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Kepler model server", "version": "1"},
        "paths": _openapi_paths(),
        "components": {"schemas": schemas},
    }


def _error(description: str) -> dict[str, Any]:
    schema = {"$ref": "#/components/schemas/Error"}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _json(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {}}}}


def _query(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema}


def _openapi_paths() -> dict[str, Any]:
    body = {"application/json": {"schema": {"$ref": "#/components/schemas/ModelRequest"}}}
    model_ok = {
        "description": "weight JSON (weight: true), else the model archive",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "application/zip": {"schema": {"type": "string", "format": "binary"}},
        },
    }
    output_types = [o.value for o in OutputType]
    return {
        "/model": {
            "post": {
                "summary": "The best published model for a client's metrics",
                "requestBody": {"required": True, "content": body},
                "responses": {
                    "200": model_ok,
                    "400": _error("invalid JSON, unknown energy source or malformed filter"),
                    "404": _error("no published model matches; says what was searched"),
                    "413": _error("request body too large"),
                    "422": _error("a field has the wrong type or value"),
                    "503": _error("the selected archive vanished; retry"),
                },
            }
        },
        "/best-models": {
            "get": {
                "summary": "Best model name per output type and feature group",
                "parameters": [
                    _query("energy-source", {"type": "string"}),
                    _query("output-type", {"type": "string", "enum": output_types}),
                    _query("feature-group", {"type": "string"}),
                    _query("node-type", {"type": "integer", "minimum": -1}),
                    _query("filter", {"type": "string"}),
                ],
                "responses": {
                    "200": _json("{output type: {feature group: model name}}"),
                    "400": _error("unknown energy source or malformed filter"),
                    "422": _error("a query parameter has the wrong type"),
                },
            }
        },
        "/pipelines": {"get": {"responses": {"200": _json("loaded pipelines")}}},
        "/healthz": {"get": {"responses": {"200": _json("the process answers")}}},
        "/readyz": {
            "get": {
                "responses": {
                    "200": _json("at least one pipeline is loaded"),
                    "503": _json("no pipeline loaded"),
                }
            }
        },
        "/metrics": {
            "get": {
                "responses": {
                    "200": {
                        "description": "Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                }
            }
        },
    }
