"""Raw Kepler series read from a live Prometheus with ``query_range``.

Queries ask for the plain metric (no ``rate()``), so the answer has the shape of a saved dump and
becomes the same long sample frame. Evaluation times sit on a grid of whole multiples of the
step, so windows fetched at different times land on the same timestamps and overlap cleanly.
Prometheus refuses a range query of more than 11,000 points per series; longer windows are
split into chunks below that. Steps are whole seconds: the client sends whole-second bounds.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import zip_longest

import polars as pl
import requests
from prometheus_api_client import PrometheusApiClientException, PrometheusConnect
from urllib3.util.retry import Retry

from kepler_model.settings import Settings
from modelling.extract import (
    ACCELERATOR_METRIC,
    FEATURE_ALIASES,
    FREQUENCY_METRIC,
    NODE_INFO_METRICS,
    energy_metric,
    feature_metric,
)
from modelling.vocabulary import SOURCE_COMPONENTS, WORKLOAD_FEATURES
from storage.dumps import dump_to_frame

MAX_POINTS = 11_000
PACKAGE_RATIO_METRIC = "kepler_container_cpu_usage_per_package_ratio"
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)")
_UNIT_SECONDS = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 7 * 86400.0,
    "y": 365 * 86400.0,
}


class PrometheusQueryError(RuntimeError):
    """Prometheus could not be reached or refused a query."""


class DurationError(ValueError):
    """A duration that is neither seconds nor Prometheus' ``1h30m`` form."""


@dataclass(frozen=True)
class QueryWindow:
    """Evaluation times ``start, start + step, ..., end`` of one metric (Unix seconds)."""

    metric: str
    start: float
    end: float


@dataclass(frozen=True, repr=False)
class PrometheusSource:
    """Where and how to query: the server, TLS checking, credentials and a request timeout."""

    url: str
    ssl_disable: bool = False
    bearer_token: str = ""
    username: str = ""
    password: str = ""
    timeout: float = 60.0

    @classmethod
    def from_settings(cls, settings: Settings) -> PrometheusSource:
        return cls(
            url=settings.prom_server.rstrip("/"),
            ssl_disable=settings.prom_ssl_disable,
            bearer_token=settings.prom_bearer_token.get_secret_value(),
            username=settings.prom_username,
            password=settings.prom_password.get_secret_value(),
            timeout=settings.prom_query_timeout,
        )

    def __repr__(self) -> str:
        return f"PrometheusSource(url={self.url!r})"

    def connect(self, session: requests.Session) -> PrometheusConnect:
        """A client on ``session`` that never retries by itself: the Prefect task retries."""
        session.verify = not self.ssl_disable
        headers = {"Authorization": f"Bearer {self.bearer_token}"} if self.bearer_token else None
        auth = (self.username, self.password) if self.username else None
        return PrometheusConnect(
            url=self.url,
            headers=headers,
            retry=Retry(total=0),
            auth=auth,
            session=session,
            timeout=self.timeout,
        )


def check_reachable(source: PrometheusSource) -> None:
    """One request to the server's root, without retries; raises PrometheusQueryError when
    nothing answers there or the answer is an error."""
    with requests.Session() as session:
        try:
            answered = source.connect(session).check_prometheus_connection()
        except requests.RequestException as error:
            raise PrometheusQueryError(f"{source.url} does not answer: {error}") from None
    if not answered:
        raise PrometheusQueryError(f"{source.url} answers with an error status")


def training_metrics(thirdparty: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Every metric name the extraction reads, under the names any Kepler version exports."""
    features = [feature_metric(f) for f in WORKLOAD_FEATURES]
    aliases = [name for names in FEATURE_ALIASES.values() for name in names]
    components = sorted({c for parts in SOURCE_COMPONENTS.values() for c in parts})
    energy = [energy_metric(c) for c in components]
    system = [FREQUENCY_METRIC, *NODE_INFO_METRICS, ACCELERATOR_METRIC, PACKAGE_RATIO_METRIC]
    extra = [name for m in thirdparty for name in (feature_metric(m), m)]
    return tuple(dict.fromkeys([*features, *aliases, *energy, *system, *extra]))


def duration_seconds(text: str) -> float:
    """``300``, ``300s``, ``7d`` or ``1h30m`` in seconds."""
    cleaned = text.strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", cleaned):
        return float(cleaned)
    parts = _DURATION.findall(cleaned)
    if not parts or "".join(n + u for n, u in parts) != cleaned:
        raise DurationError(f"{text!r} is not a duration such as 300, 300s, 6h, 7d or 1h30m")
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def align(timestamp: float, step: int) -> float:
    """The grid time at or before ``timestamp``."""
    return float(math.floor(timestamp / step) * step)


def split_window(
    metric: str, start: float, end: float, step: int, max_points: int = MAX_POINTS
) -> list[QueryWindow]:
    """Grid-aligned chunks of ``[start, end]``, each at most ``max_points`` evaluation times,
    in time order; they touch no time twice and leave none out."""
    if max_points < 1:
        raise ValueError("max_points must be at least 1")
    first, last = align(start, step), align(end, step)
    span = (max_points - 1) * step
    windows: list[QueryWindow] = []
    while first <= last:
        upper = min(first + span, last)
        windows.append(QueryWindow(metric, first, upper))
        first = upper + step
    return windows


def fetch_range(source: PrometheusSource, window: QueryWindow, step: int) -> pl.DataFrame:
    """The raw samples of one metric over one window, as the long sample frame."""
    try:
        with requests.Session() as session:
            result = source.connect(session).custom_query_range(
                query=window.metric,
                start_time=_utc(window.start),
                end_time=_utc(window.end),
                step=str(step),
            )
    except (requests.RequestException, PrometheusApiClientException) as error:
        raise PrometheusQueryError(
            f"query_range {window.metric} [{window.start:.0f}, {window.end:.0f}] step {step} "
            f"on {source.url} failed: {error}"
        ) from error
    return dump_to_frame({window.metric: result})


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, tz=UTC)


def start_times(
    metrics: list[str],
    watermarks: dict[str, float],
    start: float | None,
    end: float,
    step: int,
    first_window: float,
    keep: float,
) -> dict[str, float]:
    """Where each metric's fetch begins: ``start`` when given; else one step before its
    watermark (the edge sample is fetched twice and stored once), but no earlier than ``keep``
    before ``end``; else ``first_window`` before ``end``."""
    if start is not None:
        return dict.fromkeys(metrics, start)
    return {
        m: max(watermarks[m] - step, end - keep) if m in watermarks else end - first_window
        for m in metrics
    }


def plan_rounds(
    starts: dict[str, float], end: float, step: int, max_points: int = MAX_POINTS
) -> list[list[QueryWindow]]:
    """Chunks of every metric's window, grouped in rounds: round k holds each metric's k-th
    chunk, so a round covers the same stretch of time for all metrics that started together."""
    chunks = [split_window(m, first, end, step, max_points) for m, first in starts.items()]
    rounds = zip_longest(*chunks)
    return [[w for w in windows if w is not None] for windows in rounds]
