"""The model server's ``/metrics``: its own traffic and what it serves, in Prometheus' format.

Request counts and latencies are counted by route template and status. What is loaded (pipelines,
model counts, each model's error and every published weight) is read from the current catalogue
at each scrape, so the figures always describe the catalogue being served.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from modelling.vocabulary import main_feature
from storage.catalogue import Catalogue, ModelEntry, Pipeline

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
MODEL_LABELS = ["pipeline", "source", "output_type", "feature_group", "model"]
WEIGHT_LABELS = [*MODEL_LABELS, "component", "feature", "kind"]

# (component, feature, kind, value) of one published weight.
WeightSample = tuple[str, str, str, float]


def model_counts(pipeline: Pipeline) -> dict[tuple[str, str], int]:
    """Models of a pipeline by (energy source, output type)."""
    counts: dict[tuple[str, str], int] = {}
    for entry in pipeline.models:
        key = (entry.source, entry.output_type)
        counts[key] = counts.get(key, 0) + 1
    return counts


def _number(value: Any) -> float | None:
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if is_number else None


def weight_samples(entry: ModelEntry) -> Iterator[WeightSample]:
    """Every number of the model's weight JSON: bias, per-feature weight and scale, curve."""
    for component, body in (entry.weights or {}).items():
        weights = body.get("All_Weights") if isinstance(body, dict) else None
        if isinstance(weights, dict):
            yield from _component_samples(entry, component, weights)


def _component_samples(
    entry: ModelEntry, component: str, weights: dict[str, Any]
) -> Iterator[WeightSample]:
    bias = _number(weights.get("Bias_Weight"))
    if bias is not None:
        yield component, "", "bias", bias
    numerical = weights.get("Numerical_Variables")
    for feature, terms in (numerical if isinstance(numerical, dict) else {}).items():
        for kind in ("weight", "scale"):
            value = _number(terms.get(kind)) if isinstance(terms, dict) else None
            if value is not None:
                yield component, feature, kind, value
    curve = weights.get("CurveFit_Weights")
    feature = curve_feature(entry, component)
    for index, param in enumerate(curve if isinstance(curve, list) else []):
        value = _number(param)
        if value is not None:
            yield component, feature, f"curve_fit_{index}", value


def curve_feature(entry: ModelEntry, component: str) -> str:
    """The feature a component's curve was fitted on, as recorded, else the group's main one."""
    recorded = entry.metadata.get("curve_features")
    if isinstance(recorded, dict) and isinstance(recorded.get(component), str):
        return str(recorded[component])
    return main_feature(entry.feature_group, component)


def _model_labels(entry: ModelEntry) -> list[str]:
    return [entry.pipeline, entry.source, entry.output_type, entry.feature_group, entry.name]


class CatalogueCollector:
    """Prometheus view of what is loaded: pipelines, model counts, errors and weights."""

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
        yield self._model_weights(catalogue)

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
            labels=[*MODEL_LABELS, "key"],
        )
        for entry in _entries(catalogue):
            value = _number(entry.metadata.get(self.error_key))
            if value is not None:
                family.add_metric([*_model_labels(entry), self.error_key], value)
        return family

    def _model_weights(self, catalogue: Catalogue) -> Metric:
        family = GaugeMetricFamily(
            "kepler_model_server_model_weight",
            "Published weights of weight-capable models, as Kepler reads them: kind is "
            "weight, scale, bias or curve_fit_<i> (the i-th curve parameter)",
            labels=WEIGHT_LABELS,
        )
        for entry in _entries(catalogue):
            labels = _model_labels(entry)
            for component, feature, kind, value in weight_samples(entry):
                family.add_metric([*labels, component, feature, kind], value)
        return family


def _entries(catalogue: Catalogue) -> Iterator[ModelEntry]:
    for pipeline in catalogue.pipelines.values():
        yield from pipeline.models


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
