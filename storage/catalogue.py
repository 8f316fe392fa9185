"""What is published, and which published model answers a request (SPEC section 6).

A catalogue is an immutable snapshot of the pipelines found on disk; a new publish is picked up
by building a new snapshot and swapping it in, never by changing one in place.
"""

from __future__ import annotations

import json
import logging
import math
import time
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelling.archive import UnsafeArchiveError, check_archive
from modelling.machine_spec import MachineSpec
from modelling.node_types import NodeTypeIndex, NodeTypeIndexError, NodeTypeMatch, with_runner_up
from modelling.vocabulary import (
    CURVE_FIT_TRAINERS,
    FEATURE_GROUPS,
    PLATFORM_COMPONENTS,
    RAPL_COMPONENTS,
    OutputType,
    main_feature,
    parse_model_name,
    valid_groups,
)

logger = logging.getLogger(__name__)


class NoModelError(LookupError):
    """No published model satisfies a request; says what was searched and what exists."""

    def __init__(self, message: str, searched: dict[str, Any], available: list[str]) -> None:
        super().__init__(message)
        self.searched = searched
        self.available = available


class FilterError(ValueError):
    """A ``filter`` string that is not ``key:value;key:value``."""


@dataclass(frozen=True)
class ModelEntry:
    """One published model: where its files are and what its metadata says."""

    pipeline: str
    source: str
    output_type: str
    feature_group: str
    name: str
    trainer: str
    node_type: int
    metadata: dict[str, Any]
    archive: Path
    weights: dict[str, Any] | None

    @property
    def features(self) -> tuple[str, ...]:
        return tuple(self.metadata.get("features") or FEATURE_GROUPS.get(self.feature_group, ()))

    def error(self, key: str) -> float:
        value = self.metadata.get(key)
        return float(value) if isinstance(value, int | float) and value >= 0 else float("inf")


@dataclass(frozen=True)
class Pipeline:
    name: str
    path: Path
    metadata: dict[str, Any]
    node_type_index: dict[str, Any]
    models: tuple[ModelEntry, ...]
    node_types: NodeTypeIndex = field(default_factory=NodeTypeIndex)


@dataclass(frozen=True)
class ModelQuery:
    """What a client asks for; the fields of Kepler's model request."""

    metrics: tuple[str, ...]
    output_type: str
    source: str = "rapl-sysfs"
    node_type: int = -1
    weight: bool = False
    trainer_name: str = ""
    filter: str = ""
    pipeline_name: str = ""
    loose_node_type: bool = True
    machine_spec: MachineSpec | None = None


@dataclass(frozen=True)
class Selection:
    """The chosen model; ``match`` says how its node type fits the query's machine spec."""

    entry: ModelEntry
    node_type_matched: bool
    match: NodeTypeMatch | None = None


FILTER_ERRORS = ("mae", "mape")
FILTER_COMPONENTS = (*RAPL_COMPONENTS, *PLATFORM_COMPONENTS)


def parse_filter(text: str) -> dict[str, str]:
    """``mae:10;features:a,b`` -> {"mae": "10", "features": "a,b"}.

    Keys are ``features``, an error (``mae``, ``mape``) or a component's error
    (``package_mae``); error bounds are finite numbers. Anything else is a FilterError rather
    than a filter that silently rejects, or passes, every model.
    """
    result: dict[str, str] = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        key, sep, value = (piece.strip() for piece in part.partition(":"))
        if not sep or not key:
            raise FilterError(f"filter part {part!r} is not key:value")
        if key != "features":
            _check_error_bound(key, value)
        result[key] = value
    return result


def _check_error_bound(key: str, bound: str) -> None:
    component, _, error = key.rpartition("_")
    if error not in FILTER_ERRORS or (component and component not in FILTER_COMPONENTS):
        known = ", ".join(["features", *FILTER_ERRORS, "<component>_mae", "<component>_mape"])
        raise FilterError(f"unknown filter key {key!r}; known: {known}")
    try:
        limit = float(bound)
    except ValueError:
        raise FilterError(f"filter {key}:{bound} needs a number") from None
    if not math.isfinite(limit):
        raise FilterError(f"filter {key}:{bound} needs a finite number")


def _passes(entry: ModelEntry, conditions: dict[str, str]) -> bool:
    for key, bound in conditions.items():
        if key == "features":
            if not set(entry.features) <= set(bound.split(",")):
                return False
            continue
        if entry.error(key) > float(bound):
            return False
    return True


def curve_weights_usable(entry: ModelEntry, first_metric: str) -> bool:
    """Kepler feeds every curve its request's first metric; serve only where that is right."""
    assert entry.weights is not None
    recorded = entry.metadata.get("curve_features") or {}
    for component, body in entry.weights.items():
        if not isinstance(body, dict) or "All_Weights" not in body:
            continue
        params = body["All_Weights"].get("CurveFit_Weights") or []
        if params and params[0] == 0.0:
            continue  # constant: the feature does not matter
        feature = recorded.get(component) or main_feature(entry.feature_group, component)
        if feature != first_metric:
            return False
    return True


@dataclass(frozen=True)
class Catalogue:
    pipelines: dict[str, Pipeline] = field(default_factory=dict)
    default_pipeline: str = ""
    error_key: str = "mae"

    @property
    def model_count(self) -> int:
        return sum(len(p.models) for p in self.pipelines.values())

    def candidates(self, query: ModelQuery) -> list[ModelEntry]:
        """Models of the query's source and output type whose group the metrics support.

        Without a pipeline name, the default pipeline's models when it has any: the others
        only stand in for it, however low their errors.
        """
        found = self._candidates(query)
        preferred = [entry for entry in found if entry.pipeline == self.default_pipeline]
        return preferred or found

    def _candidates(self, query: ModelQuery) -> list[ModelEntry]:
        groups = set(valid_groups(query.metrics))
        conditions = parse_filter(query.filter)
        found = []
        for pipeline in self._pipelines_for(query):
            for entry in pipeline.models:
                if entry.source != query.source or entry.output_type != query.output_type:
                    continue
                if entry.feature_group not in groups or not set(entry.features) <= set(
                    query.metrics
                ):
                    continue
                if query.trainer_name and entry.trainer != query.trainer_name:
                    continue
                if query.weight and not self._weight_ok(entry, query):
                    continue
                if _passes(entry, conditions):
                    found.append(entry)
        return found

    def _weight_ok(self, entry: ModelEntry, query: ModelQuery) -> bool:
        if entry.weights is None:
            return False
        if entry.trainer in CURVE_FIT_TRAINERS:
            return bool(query.metrics) and curve_weights_usable(entry, query.metrics[0])
        return True

    def _pipelines_for(self, query: ModelQuery) -> list[Pipeline]:
        if query.pipeline_name:
            pipeline = self.pipelines.get(query.pipeline_name)
            return [pipeline] if pipeline else []
        return [pipeline for _, pipeline in sorted(self.pipelines.items())]

    def select(self, query: ModelQuery) -> Selection:
        """The best model for ``query`` (SPEC sections 6, 8).

        The requested node type first; else, given a machine spec, the node type that covers
        it or the most similar one (when loose); else, when loose, the best of any node type.
        """
        ranked, matches = self._rank(query)
        if ranked:
            best = ranked[0]
            match = _match_of(best, matches)
            if best.node_type == query.node_type:
                return Selection(best, True, match)
            if match is not None and (match.exact or query.loose_node_type):
                _log_match(best, match)
                return Selection(best, match.exact, match)
            if match is None and (query.loose_node_type or query.node_type < 0):
                return Selection(best, query.node_type < 0)
        raise NoModelError(
            "no published model matches the request",
            searched=self._describe(query),
            available=self.available(query.source, query.output_type),
        )

    def ranked(self, query: ModelQuery) -> list[ModelEntry]:
        """Every candidate, in the order ``select`` prefers them."""
        return self._rank(query)[0]

    def _rank(
        self, query: ModelQuery
    ) -> tuple[list[ModelEntry], dict[tuple[str, int], NodeTypeMatch]]:
        found = self.candidates(query)
        matches = self._spec_matches(found, query.machine_spec)

        def key(entry: ModelEntry) -> tuple[bool, bool, float, float, str]:
            match = matches.get((entry.pipeline, entry.node_type))
            fit = (not match.exact, -match.similarity) if match else (False, 0.0)
            requested = entry.node_type == query.node_type
            return (not requested, *fit, entry.error(self.error_key), entry.name)

        return sorted(found, key=key), matches

    def _spec_matches(
        self, entries: list[ModelEntry], spec: MachineSpec | None
    ) -> dict[tuple[str, int], NodeTypeMatch]:
        """How each (pipeline, node type) among ``entries`` fits ``spec``; {} without a spec."""
        if spec is None or not spec.known():
            return {}
        matches = {}
        for entry in entries:
            key = (entry.pipeline, entry.node_type)
            if key not in matches:
                node_types = self.pipelines[entry.pipeline].node_types
                matches[key] = node_types.score(entry.node_type, spec)
        return matches

    def _better(self, entry: ModelEntry, than: ModelEntry) -> bool:
        """Whether ``entry`` ranks before ``than``: the default pipeline's first, then errors."""

        def key(e: ModelEntry) -> tuple[bool, float, str]:
            return (e.pipeline != self.default_pipeline, e.error(self.error_key), e.name)

        return key(entry) < key(than)

    def _describe(self, query: ModelQuery) -> dict[str, Any]:
        return {
            "pipeline": query.pipeline_name or "any",
            "source": query.source,
            "output_type": query.output_type,
            "feature_groups": valid_groups(query.metrics),
            "trainer_name": query.trainer_name or "any",
            "node_type": query.node_type,
            "machine_spec": query.machine_spec.to_dict() if query.machine_spec else None,
            "loose_node_type": query.loose_node_type,
            "weight": query.weight,
            "filter": query.filter,
        }

    def available(self, source: str, output_type: str) -> list[str]:
        """``pipeline/source/OutputType/group/model`` of every model, for error replies."""
        return sorted(
            f"{e.pipeline}/{e.source}/{e.output_type}/{e.feature_group}/{e.name}"
            for p in self.pipelines.values()
            for e in p.models
            if (not source or e.source == source)
            and (not output_type or e.output_type == output_type)
        )

    def best_models(
        self,
        source: str,
        output_type: str | None,
        group: str | None,
        node_type: int | None,
        filter_text: str = "",
    ) -> dict[str, dict[str, str]]:
        """{output type: {feature group: best model name}}, as ``GET /best-models`` answers."""
        conditions = parse_filter(filter_text)
        best: dict[str, dict[str, ModelEntry]] = {}
        for pipeline in self._pipelines_for(ModelQuery((), output_type or "")):
            for entry in pipeline.models:
                if entry.source != source or (output_type and entry.output_type != output_type):
                    continue
                if (group and entry.feature_group != group) or (
                    node_type is not None and node_type >= 0 and entry.node_type != node_type
                ):
                    continue
                if not _passes(entry, conditions):
                    continue
                groups = best.setdefault(entry.output_type, {})
                current = groups.get(entry.feature_group)
                if current is None or self._better(entry, current):
                    groups[entry.feature_group] = entry
        return {ot: {g: e.name for g, e in gs.items()} for ot, gs in best.items()}


def _match_of(
    entry: ModelEntry, matches: dict[tuple[str, int], NodeTypeMatch]
) -> NodeTypeMatch | None:
    """The entry's node type match, with the best other node type of its pipeline as runner-up."""
    match = matches.get((entry.pipeline, entry.node_type))
    if match is None:
        return None
    others = [m for (pipeline, _), m in matches.items() if pipeline == entry.pipeline]
    return with_runner_up(match, others)


def _log_match(entry: ModelEntry, match: NodeTypeMatch) -> None:
    log = logger.debug if match.exact else logger.info
    log(
        "machine spec -> node type %d of %s (%s, similarity %.3f, uncertainty %.3f; "
        "runner-up %s at %s)",
        match.node_type,
        entry.pipeline,
        "exact cover" if match.exact else "closest",
        match.similarity,
        match.uncertainty,
        match.runner_up,
        "n/a" if match.runner_up_similarity is None else f"{match.runner_up_similarity:.3f}",
    )


def load_pipeline(path: Path) -> Pipeline:
    """Index one pipeline folder: every model zip's metadata and weight JSON, nothing else.

    A versioned pipeline is read through its version folder, not its link: an entry's
    archive then stays that version's even after the link moves to a newer one.
    """
    folder = path.resolve()
    metadata = json.loads((folder / "metadata.json").read_text())
    index_file = folder / "node_type_index.json"
    node_type_index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    name = str(metadata.get("name") or path.name)
    models = []
    for archive in sorted(folder.glob("*/*/*/*.zip")):
        entry = _load_entry(name, archive)
        if entry is not None:
            models.append(entry)
    return Pipeline(
        name, path, metadata, node_type_index, tuple(models), _parse_index(name, node_type_index)
    )


def _parse_index(pipeline: str, body: Any) -> NodeTypeIndex:
    """The pipeline's node types for matching; a malformed index matches nothing, loudly."""
    try:
        return NodeTypeIndex.from_json(body, strict=False)
    except NodeTypeIndexError as exc:
        logger.warning("pipeline %s: node_type_index.json unusable for matching: %s", pipeline, exc)
        return NodeTypeIndex()


def _load_entry(pipeline: str, archive: Path) -> ModelEntry | None:
    group_dir = archive.parent
    output_type = group_dir.parent.name
    source = group_dir.parent.parent.name
    try:
        trainer, node_type = parse_model_name(archive.stem)
        with zipfile.ZipFile(archive) as handle:
            check_archive(handle, allow_pickles=True)
            metadata = json.loads(handle.read("metadata.json"))
        if not isinstance(metadata, dict):
            raise ValueError("metadata.json is not a JSON object")
        weight_file = archive.with_suffix(".json")
        weights = json.loads(weight_file.read_text()) if weight_file.is_file() else None
        if weights is not None and not isinstance(weights, dict):
            raise ValueError(f"{weight_file.name} is not a JSON object")
    except (
        ValueError,
        KeyError,
        OSError,
        EOFError,
        zipfile.BadZipFile,
        zlib.error,
        UnsafeArchiveError,
    ) as exc:
        logger.warning("skipping model %s: %s", archive, exc)
        return None
    if output_type not in {o.value for o in OutputType}:
        logger.warning("skipping model %s: unknown output type folder %s", archive, output_type)
        return None
    return ModelEntry(
        pipeline,
        source,
        output_type,
        group_dir.name,
        archive.stem,
        trainer,
        node_type,
        metadata,
        archive,
        weights,
    )


def scan(
    model_paths: Iterable[Path], default_pipeline: str = "", error_key: str = "mae"
) -> Catalogue:
    """A catalogue of every pipeline folder (one holding metadata.json) under the paths."""
    pipelines: dict[str, Pipeline] = {}
    for root in model_paths:
        if not root.is_dir():
            continue
        for path in sorted(root.iterdir()):
            if path.name.startswith(".") or not (path / "metadata.json").is_file():
                continue
            try:
                pipeline = load_pipeline(path)
            except (OSError, ValueError) as exc:
                logger.warning("skipping pipeline %s: %s", path, exc)
                continue
            pipelines.setdefault(pipeline.name, pipeline)
    return Catalogue(pipelines, default_pipeline, error_key)


def fingerprint(model_paths: Iterable[Path]) -> tuple[tuple[str, str], ...]:
    """Cheap summary that changes whenever a pipeline is published, switched or removed."""
    marks = []
    for root in model_paths:
        if not root.is_dir():
            continue
        for path in sorted(root.iterdir()):
            if path.name.startswith("."):
                continue
            metadata = path / "metadata.json"
            if path.is_symlink():
                marks.append((str(path), str(path.readlink())))
            elif metadata.is_file():
                marks.append((str(path), str(metadata.stat().st_mtime_ns)))
    return tuple(marks)


class LiveCatalogue:
    """The current catalogue, rebuilt when the published pipelines change on disk.

    Checking costs a directory listing, done at most once per ``min_interval`` seconds; a
    rebuilt catalogue replaces the old one in a single assignment, so readers never see a
    half-built one.
    """

    def __init__(
        self,
        model_paths: list[Path],
        default_pipeline: str = "",
        error_key: str = "mae",
        min_interval: float = 1.0,
    ) -> None:
        self.model_paths = model_paths
        self.default_pipeline = default_pipeline
        self.error_key = error_key
        self.min_interval = min_interval
        self._checked = 0.0
        self._mark: tuple[tuple[str, str], ...] = ()
        self._catalogue = Catalogue(error_key=error_key)
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> Catalogue:
        now = time.monotonic()
        if not force and now - self._checked < self.min_interval:
            return self._catalogue
        self._checked = now
        mark = fingerprint(self.model_paths)
        if force or mark != self._mark:
            self._catalogue = scan(self.model_paths, self.default_pipeline, self.error_key)
            self._mark = mark
            logger.info(
                "catalogue loaded: %d pipelines, %d models",
                len(self._catalogue.pipelines),
                self._catalogue.model_count,
            )
        return self._catalogue

    def current(self) -> Catalogue:
        return self.refresh()
