"""Where the estimator gets power models, and the caches that keep them loaded.

Order (SPEC section 7): the pipelines published under MODEL_PATH, then the model server when
it is enabled, then the initial model URLs (NODE_COMPONENTS_INIT_URL for DynPower,
NODE_TOTAL_INIT_URL for AbsPower). Calls come from the server's worker threads, so the caches
are guarded by locks; a model is loaded or downloaded by one thread while the others keep
answering from what is already cached.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse
from urllib.request import url2pathname

import httpx
import numpy as np

from estimator.evaluation import ServingModel
from estimator.protocol import EstimatorError, RequestError
from kepler_model.settings import Settings
from modelling.archive import UnsafeArchiveError, read_archive_json_members
from modelling.components import (
    ComponentModel,
    CurveComponent,
    LinearComponent,
    ModelFileError,
)
from modelling.machine_spec import MachineSpec
from modelling.power_model import PowerModel
from modelling.vocabulary import (
    OutputType,
    components_of,
    main_feature,
    parse_model_name,
)
from storage.catalogue import Catalogue, FilterError, LiveCatalogue, ModelEntry, ModelQuery

logger = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT = httpx.Timeout(10.0, connect=3.0)
MAX_DOWNLOAD_BYTES = 256 * 1024 * 1024
MAX_CACHED = 64
FIRST_RETRY_SECONDS = 1.0
MAX_RETRY_SECONDS = 300.0
CURVE_TRAINERS: Mapping[str, str] = {
    "LogarithmicRegressionTrainer": "logarithmic",
    "ExponentialRegressionTrainer": "exponential",
    "LogisticRegressionTrainer": "logistic",
}

Key = TypeVar("Key", bound=Hashable)
Value = TypeVar("Value")


class ModelUnavailableError(EstimatorError):
    """No model could be found or loaded for a request; says what was tried."""


class DownloadError(OSError):
    """A model URL or the model server did not deliver."""


@dataclass
class Backoff:
    """Failures of one download: each retry waits twice as long as the last, up to a cap."""

    failures: int = 0
    next_attempt: float = 0.0
    cause: str = ""

    def ready(self, now: float) -> bool:
        return now >= self.next_attempt

    def failed(self, cause: str, now: float) -> bool:
        """Record a failure; True when its cause differs from the previous one."""
        self.failures += 1
        delay = min(MAX_RETRY_SECONDS, FIRST_RETRY_SECONDS * 2 ** (self.failures - 1))
        self.next_attempt = now + delay
        new_cause = cause != self.cause
        self.cause = cause
        return new_cause


def remember(cache: dict[Key, Value], key: Key, value: Value) -> None:
    """Insert, dropping the oldest entry when the cache is full."""
    if key not in cache and len(cache) >= MAX_CACHED:
        cache.pop(next(iter(cache)))
    cache[key] = value


def core_ratio(model: PowerModel, cpu_count: int) -> float:
    """This machine's logical CPUs over those of the model's machine; 1 when unknown."""
    spec = model.metadata.get("machine_spec")
    cores = spec.get("cores") if isinstance(spec, dict) else None
    if isinstance(cores, int | float) and not isinstance(cores, bool) and cores > 0:
        return cpu_count / float(cores)
    return 1.0


def model_from_weights(
    name: str,
    trainer: str,
    weights: Mapping[str, Any],
    curve_feature: Callable[[str], str],
    features: Sequence[str] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> PowerModel:
    """A model rebuilt from Kepler's weight JSON, for archives we must not unpickle.

    Kepler leaves x_i = 0 for a zero scale; an infinite divisor does the same here.
    ``curve_feature(component)`` names the feature a curve-fit component is evaluated on.
    """
    try:
        return _model_from_weights(name, trainer, weights, curve_feature, features, metadata)
    except ModelFileError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelFileError(f"weight JSON of {name} is malformed: {exc!r}") from exc


def _model_from_weights(
    name: str,
    trainer: str,
    weights: Mapping[str, Any],
    curve_feature: Callable[[str], str],
    features: Sequence[str] | None,
    metadata: Mapping[str, Any] | None,
) -> PowerModel:
    bodies = _weight_bodies(weights)
    order = tuple(features or bodies[next(iter(bodies))]["Numerical_Variables"])
    scale = _weight_scale(bodies, order)
    components: dict[str, ComponentModel] = {}
    for component, body in bodies.items():
        if "Bias_Weight" in body:
            components[component] = _linear(body, order)
        elif "CurveFit_Weights" in body and trainer in CURVE_TRAINERS:
            feature = curve_feature(component)
            if feature not in order:
                raise ModelFileError(f"curve of {component} uses {feature}, not a model feature")
            params = tuple(float(p) for p in body["CurveFit_Weights"])
            curve = CURVE_TRAINERS[trainer]
            components[component] = CurveComponent(curve, params, feature, order.index(feature))
        else:
            raise ModelFileError(f"weights of {component} are neither linear nor a known curve")
    details = {**(metadata or {}), "model_name": name, "built_from": "weight JSON"}
    return PowerModel(name, order, scale, components, details)


def _weight_bodies(weights: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    bodies = {
        component: body["All_Weights"]
        for component, body in weights.items()
        if isinstance(body, dict) and isinstance(body.get("All_Weights"), dict)
    }
    if not bodies:
        raise ModelFileError("weight JSON holds no component weights")
    for component, body in bodies.items():
        if not isinstance(body.get("Numerical_Variables"), dict):
            raise ModelFileError(f"weights of {component} lack their Numerical_Variables object")
    return bodies


def _weight_scale(bodies: Mapping[str, dict[str, Any]], order: Sequence[str]) -> np.ndarray:
    scales = set()
    for component, body in bodies.items():
        try:
            variables = body["Numerical_Variables"]
            scales.add(tuple(float(variables[f]["scale"]) for f in order))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"weights of {component} lack a feature scale: {exc}") from exc
    if len(scales) != 1:
        raise ModelFileError("components scale the features differently")
    scale = np.asarray(scales.pop(), dtype=float)
    return np.where(scale == 0.0, np.inf, scale)


def _linear(body: Mapping[str, Any], order: Sequence[str]) -> LinearComponent:
    try:
        variables = body["Numerical_Variables"]
        coef = tuple(float(variables[f]["weight"]) for f in order)
        return LinearComponent(float(body["Bias_Weight"]), coef)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"malformed linear weights: {exc}") from exc


def fetch_bytes(url: str, client: httpx.Client) -> bytes:
    """The bytes at an http(s) URL, a ``file://`` URL or a plain path."""
    scheme = urlparse(url).scheme
    try:
        if scheme in ("http", "https"):
            response = client.get(url)
            if response.status_code != 200:
                raise DownloadError(f"{url} answered HTTP {response.status_code}")
            return _bounded(response.content, url)
        path = Path(url2pathname(urlparse(url).path)) if scheme == "file" else Path(url)
        return _bounded(path.read_bytes(), url)
    except httpx.HTTPError as exc:
        raise DownloadError(f"{url}: {exc}") from exc
    except OSError as exc:
        raise DownloadError(f"{url}: {exc.strerror or exc}") from exc


def _bounded(data: bytes, url: str) -> bytes:
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise DownloadError(f"{url} is larger than {MAX_DOWNLOAD_BYTES} bytes")
    return data


class ModelProvider:
    """The model for a request: from disk, the model server or an initial URL, cached.

    Disk models are cached by output type, source, trainer, feature set and the archive's
    resolved path and modification time, so a new publish (a new version folder) is a new
    entry. Downloads that fail are retried with exponential backoff, never on every request,
    and each new cause is logged once.
    """

    def __init__(
        self,
        settings: Settings,
        client: httpx.Client | None = None,
        clock: Callable[[], float] = time.monotonic,
        remote_ttl: float = 300.0,
        refresh_seconds: float = 1.0,
        machine_spec: MachineSpec | None = None,
    ) -> None:
        # This machine's spec: published models of the node type closest to it come first.
        self._machine_spec = machine_spec
        self._live = LiveCatalogue(
            [settings.model_path],
            settings.default_pipeline,
            settings.error_key,
            min_interval=refresh_seconds,
        )
        self._model_path = settings.model_path
        self._server_url = settings.model_server_url.rstrip("/")
        self._server_enabled = settings.model_server_enable
        self._init_urls = {
            OutputType.DYN_POWER.value: (
                "NODE_COMPONENTS_INIT_URL",
                settings.node_components_init_url,
            ),
            OutputType.ABS_POWER.value: ("NODE_TOTAL_INIT_URL", settings.node_total_init_url),
        }
        self._client = client or httpx.Client(timeout=DOWNLOAD_TIMEOUT)
        self._clock = clock
        self._remote_ttl = remote_ttl
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._fetch_lock = threading.Lock()
        self._ranked_from: Catalogue | None = None
        self._ranked: dict[ModelQuery, tuple[ModelEntry, ...]] = {}
        self._chosen: dict[ModelQuery, PowerModel] = {}
        self._refresh_seconds = refresh_seconds
        self._catalogue_checked = -math.inf
        self._loaded: dict[tuple[Any, ...], PowerModel] = {}
        self._unloadable: dict[tuple[Any, ...], str] = {}
        self._fetched: dict[Hashable, tuple[PowerModel, float]] = {}
        self._backoff: dict[Hashable, Backoff] = {}

    def close(self) -> None:
        self._client.close()

    def model_for(self, query: ModelQuery) -> PowerModel:
        """The best model for ``query``, trying each acquisition route in the SPEC's order."""
        query = self._for_this_machine(query)
        routes = [self._from_disk]
        if self._server_enabled:
            routes.append(self._from_model_server)
        routes.append(self._from_init_url)
        reasons = []
        for route in routes:
            try:
                return route(query)
            except ModelUnavailableError as exc:
                reasons.append(str(exc))
        raise ModelUnavailableError("; ".join(reasons))

    def cached(self, query: ModelQuery) -> PowerModel | None:
        """What ``model_for`` would return, when that needs neither disk nor network; else None.

        That is a published model already loaded for ``query``, while the catalogue was last
        checked for new publishes less than ``refresh_seconds`` ago.
        """
        if self._clock() - self._catalogue_checked >= self._refresh_seconds:
            return None
        return self._chosen.get(self._for_this_machine(query))

    def _for_this_machine(self, query: ModelQuery) -> ModelQuery:
        if query.machine_spec is None and self._machine_spec is not None:
            return replace(query, machine_spec=self._machine_spec)
        return query

    # Published models on disk.

    def _from_disk(self, query: ModelQuery) -> PowerModel:
        catalogue, ranked = self._ranked_entries(query)
        # Until the catalogue changes, a query gets the model it got last time: checking the
        # archive again (resolve and stat) took half the time of a cheap model's request.
        chosen = self._chosen.get(query)
        if chosen is not None:
            return chosen
        if not ranked:
            raise ModelUnavailableError(describe_missing(catalogue, query, self._model_path))
        reasons = []
        for entry in ranked:
            try:
                model = self._load_entry(entry, catalogue)
            except ModelFileError as exc:
                reasons.append(f"{entry.name}: {exc}")
                continue
            with self._lock:
                if catalogue is self._ranked_from:
                    remember(self._chosen, query, model)
            return model
        raise ModelUnavailableError(
            f"{len(ranked)} published model(s) fit but none loads; {reasons[0]}"
        )

    def _ranked_entries(self, query: ModelQuery) -> tuple[Catalogue, tuple[ModelEntry, ...]]:
        with self._lock:
            catalogue = self._live.current()
            self._catalogue_checked = self._clock()
            if catalogue is not self._ranked_from:
                self._ranked_from, self._ranked, self._chosen = catalogue, {}, {}
            ranked = self._ranked.get(query)
        if ranked is not None:
            return catalogue, ranked
        try:
            # The order Catalogue.select picks from; the next ones stand in when the best won't
            # load.
            ranked = tuple(catalogue.ranked(query))
        except FilterError as exc:
            raise RequestError(f"bad filter {query.filter!r}: {exc}") from None
        with self._lock:
            if catalogue is self._ranked_from:
                remember(self._ranked, query, ranked)
        return catalogue, ranked

    def _load_entry(self, entry: ModelEntry, catalogue: Catalogue) -> PowerModel:
        """The entry's model, loaded once per archive version; raises ModelFileError."""
        archive = entry.archive.resolve()
        try:
            stamp = archive.stat().st_mtime_ns
        except OSError as exc:
            raise ModelFileError(f"archive vanished: {exc.strerror}") from None
        key = (entry.output_type, entry.source, entry.trainer, entry.features, archive, stamp)
        model = self._loaded.get(key)
        refusal = self._unloadable.get(key)
        if model is not None:
            return model
        if refusal is not None:
            raise ModelFileError(refusal)
        with self._load_lock:
            model = self._loaded.get(key)
            if model is None:
                model = self._read(entry, archive, catalogue, key)
        return model

    def _read(
        self, entry: ModelEntry, archive: Path, catalogue: Catalogue, key: tuple[Any, ...]
    ) -> PowerModel:
        try:
            model = ServingModel.of(read_entry(entry, archive, catalogue))
        except (ModelFileError, UnsafeArchiveError, OSError) as exc:
            logger.warning("cannot load model %s: %s", archive, exc)
            remember(self._unloadable, key, str(exc))
            raise ModelFileError(str(exc)) from None
        logger.info("loaded model %s from %s", entry.name, archive)
        remember(self._loaded, key, model)
        return model

    # The model server.

    def _from_model_server(self, query: ModelQuery) -> PowerModel:
        fetch = partial(self._ask_model_server, query)
        return self._download(("model server", query), "model server", fetch, self._remote_ttl)

    def _ask_model_server(self, query: ModelQuery) -> PowerModel:
        reply = self._post_model(query, weight=False)
        try:
            return PowerModel.from_archive(reply.content)
        except (UnsafeArchiveError, ModelFileError) as exc:
            logger.info("model server sent an archive we do not load (%s); asking for weights", exc)
        weights = self._post_model(query, weight=True).json()
        if not isinstance(weights, dict):
            raise ModelFileError("model server sent weights that are not a JSON object")
        name = str(weights.get("model_name") or "model-server-weights")
        trainer = name.rpartition("_")[0]
        spec = weights.get("machine_spec")
        # The server only serves curve weights whose feature is the request's first metric.
        return model_from_weights(
            name, trainer, weights, lambda _: query.metrics[0], metadata={"machine_spec": spec}
        )

    def _post_model(self, query: ModelQuery, weight: bool) -> httpx.Response:
        body = {
            "metrics": list(query.metrics),
            "output_type": query.output_type,
            "source": query.source,
            "trainer_name": query.trainer_name,
            "filter": query.filter,
            "weight": weight,
            "node_type": -1,
            "machine_spec": query.machine_spec.to_dict() if query.machine_spec else None,
        }
        url = f"{self._server_url}/model"
        try:
            response = self._client.post(url, json=body)
        except httpx.HTTPError as exc:
            raise DownloadError(f"{url}: {exc}") from exc
        if response.status_code != 200:
            raise DownloadError(f"{url} answered {response.status_code}: {response.text[:300]}")
        return response

    # The initial model URLs.

    def _from_init_url(self, query: ModelQuery) -> PowerModel:
        variable, url = self._init_urls[query.output_type]
        if not url:
            raise ModelUnavailableError(f"{variable} is not set")
        fetch = partial(read_init_model, url, self._client)
        model = self._download(("init", url), variable, fetch, ttl=None)
        missing = [f for f in model.features if f not in query.metrics]
        if missing:
            raise ModelUnavailableError(f"{variable} model needs {', '.join(missing)}")
        trainer = str(model.metadata.get("trainer") or model.name.rpartition("_")[0])
        if query.trainer_name and trainer != query.trainer_name:
            raise ModelUnavailableError(f"{variable} model is a {trainer}")
        if not set(model.components) & set(components_of(query.source)):
            raise ModelUnavailableError(f"{variable} model has no {query.source} components")
        return model

    # Downloads with backoff.

    def _download(
        self, key: Hashable, label: str, fetch: Callable[[], PowerModel], ttl: float | None
    ) -> PowerModel:
        """A downloaded model, fetched again once older than ``ttl``; failures back off.

        While a refresh fails, the model fetched before keeps being served.
        """
        with self._lock:
            cached = self._fetched.get(key)
        if cached is not None and (ttl is None or self._clock() - cached[1] < ttl):
            return cached[0]
        with self._fetch_lock:
            latest = self._fetched.get(key)
            if latest is not None and latest is not cached:
                return latest[0]  # another thread fetched it while this one waited
            backoff = self._backoff.setdefault(key, Backoff())
            now = self._clock()
            if not backoff.ready(now):
                if cached is not None:
                    return cached[0]
                wait = backoff.next_attempt - now
                raise ModelUnavailableError(f"{label}: {backoff.cause} (next try in {wait:.0f} s)")
            return self._fetch(key, label, fetch, backoff, cached)

    def _fetch(
        self,
        key: Hashable,
        label: str,
        fetch: Callable[[], PowerModel],
        backoff: Backoff,
        cached: tuple[PowerModel, float] | None,
    ) -> PowerModel:
        try:
            model = ServingModel.of(fetch())
        except (DownloadError, ModelFileError, UnsafeArchiveError, ValueError) as exc:
            if backoff.failed(str(exc), self._clock()):
                logger.warning("%s: %s; retrying with backoff", label, exc)
            if cached is not None:
                return cached[0]
            raise ModelUnavailableError(f"{label}: {exc}") from None
        if backoff.failures:
            logger.info("%s delivers again after %d failure(s)", label, backoff.failures)
        self._backoff[key] = Backoff()
        logger.info("%s: fetched model %s", label, model.name)
        with self._lock:
            remember(self._fetched, key, (model, self._clock()))
        return model


def read_entry(entry: ModelEntry, archive: Path, catalogue: Catalogue) -> PowerModel:
    """A published model; an old archive holding pickles is rebuilt from its weight JSON."""
    try:
        model = PowerModel.from_archive(archive.read_bytes())
    except (UnsafeArchiveError, ModelFileError) as exc:
        if entry.weights is None:
            raise
        recorded = entry.metadata.get("curve_features") or {}
        model = model_from_weights(
            entry.name,
            entry.trainer,
            entry.weights,
            lambda c: recorded.get(c) or main_feature(entry.feature_group, c),
            entry.features,
            entry.metadata,
        )
        logger.info("model %s: %s; built it from its weight JSON instead", entry.name, exc)
    if not isinstance(model.metadata.get("machine_spec"), dict):
        pipeline = catalogue.pipelines.get(entry.pipeline)
        node_type = pipeline.node_type_index.get(str(entry.node_type), {}) if pipeline else {}
        if isinstance(node_type, dict) and isinstance(node_type.get("attrs"), dict):
            model.metadata["machine_spec"] = node_type["attrs"]
    return model


def read_init_model(url: str, client: httpx.Client) -> PowerModel:
    """An initial model zip; when it holds pickles, the weight JSON published beside it."""
    data = fetch_bytes(url, client)
    try:
        return PowerModel.from_archive(data)
    except (UnsafeArchiveError, ModelFileError) as exc:
        if not url.endswith(".zip"):
            raise
        logger.info("initial model %s: %s; trying the weight JSON beside it", url, exc)
    members = read_archive_json_members(data)
    metadata = _json_member(members, "metadata.json")
    name = str(metadata.get("model_name") or os.path.basename(urlparse(url).path)[:-4])
    trainer, _ = parse_model_name(name)
    group = os.path.basename(os.path.dirname(urlparse(url).path))
    weights = json.loads(fetch_bytes(url[:-4] + ".json", client))
    if not isinstance(weights, dict):
        raise ModelFileError(f"weight JSON beside {url} is not a JSON object")
    recorded = metadata.get("curve_features") or {}
    return model_from_weights(
        name,
        trainer,
        weights,
        lambda c: recorded.get(c) or main_feature(group, c),
        metadata.get("features"),
        metadata,
    )


def _json_member(members: Mapping[str, bytes], name: str) -> dict[str, Any]:
    body = json.loads(members.get(name, b"{}"))
    if not isinstance(body, dict):
        raise ModelFileError(f"{name} is not a JSON object")
    return body


def describe_missing(catalogue: Catalogue, query: ModelQuery, model_path: Path) -> str:
    """Why no published model fits: what the published models of that kind would need."""
    kind = f"{query.output_type} model for {query.source}"
    entries = [
        e
        for p in catalogue.pipelines.values()
        for e in p.models
        if e.source == query.source and e.output_type == query.output_type
    ]
    if not entries:
        return f"no {kind} is published under {model_path}"
    needs = sorted(
        {
            (e.feature_group, tuple(f for f in e.features if f not in query.metrics))
            for e in entries
            if not query.trainer_name or e.trainer == query.trainer_name
        }
    )
    gaps = [f"{group} lacks {', '.join(missing)}" for group, missing in needs if missing]
    narrowed = ""
    if query.trainer_name:
        narrowed += f" by trainer {query.trainer_name}"
    if query.filter:
        narrowed += f" passing filter {query.filter!r}"
    asked = f"the metrics {', '.join(query.metrics)}" if query.metrics else "an empty metric list"
    if not gaps:
        return f"no published {kind}{narrowed} covers {asked}"
    return f"no published {kind}{narrowed} covers {asked}: " + "; ".join(gaps[:6])
