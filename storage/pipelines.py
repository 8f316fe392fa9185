"""Published pipelines on disk, in the layout of Kepler's model database, with versions.

Each publish writes a complete new version under ``<MODEL_PATH>/.versions/<pipeline>/vN`` and
then points the symbolic link ``<MODEL_PATH>/<pipeline>`` at it with one atomic rename, so a
reader sees either the old pipeline or the new one, never a mixture or a half-written file.

A publish is built in a hidden ``.staging-*`` folder beside the versions and renamed into place
only when every file is written and flushed. A writer killed at any point leaves at most such a
folder (or a hidden ``.<pipeline>.link-*`` symlink) behind: readers never look at hidden names,
and the next writer of that pipeline removes them. Writers of one pipeline (publish, rollback,
prune) take an exclusive ``flock`` on ``.versions/<pipeline>/.lock``; the kernel releases it when
its holder dies, so a killed writer never blocks the next one.
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from modelling.power_model import PowerModel

logger = logging.getLogger(__name__)

VERSIONS_DIR = ".versions"
LOCK_FILE = ".lock"
STAGING_PREFIX = ".staging-"
_VERSION = re.compile(r"^v(\d+)$")
_PIPELINE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class PipelineNameError(ValueError):
    """A pipeline name that is not a plain folder name."""


class PipelineNotFoundError(LookupError):
    """No published pipeline or version by that name."""


@dataclass(frozen=True)
class PipelineVersions:
    """One published pipeline: the version served and every complete version kept."""

    name: str
    current: int | None
    versions: list[int]
    last_update_time: str
    model_count: int


@dataclass(frozen=True)
class PublishedModel:
    """A trained model and where it belongs in the pipeline."""

    source: str
    output_type: str
    feature_group: str
    model: PowerModel
    archive: bytes = b""  # the model's zip, when already rendered (in parallel, by the fit)


def check_pipeline_name(name: str) -> str:
    if not _PIPELINE_NAME.match(name):
        raise PipelineNameError(
            f"pipeline name {name!r} must be 1-128 letters, digits, '.', '_' or '-'"
        )
    return name


def now_text() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")


def versions_root(model_path: Path, name: str) -> Path:
    return model_path / VERSIONS_DIR / name


def list_versions(model_path: Path, name: str) -> list[int]:
    root = versions_root(model_path, name)
    if not root.is_dir():
        return []
    found = (_VERSION.match(p.name) for p in root.iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def current_version(model_path: Path, name: str) -> int | None:
    """The version the pipeline link points at; None for an unversioned or absent pipeline."""
    link = model_path / name
    if not link.is_symlink():
        return None
    match = _VERSION.match(Path(os.readlink(link)).name)
    return int(match.group(1)) if match else None


@contextmanager
def pipeline_lock(model_path: Path, name: str) -> Iterator[None]:
    """Hold the pipeline's writer lock; taken by publish, rollback and prune."""
    root = versions_root(model_path, check_pipeline_name(name))
    root.mkdir(parents=True, exist_ok=True)
    with (root / LOCK_FILE).open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield


def publish(
    model_path: Path,
    name: str,
    models: Iterable[PublishedModel],
    pipeline_metadata: dict[str, Any],
    node_type_index: dict[str, Any],
) -> Path:
    """Write a new version of pipeline ``name`` holding ``models`` and switch to it.

    Models of the previous version that this publish does not replace are carried over, so
    training one energy source keeps the models of the others.
    """
    with pipeline_lock(model_path, name):
        _remove_leftovers(model_path, name)
        _adopt_unversioned(model_path, name)
        root = versions_root(model_path, name)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=root))
        try:
            version, written = _fill(staging, model_path, name, models, pipeline_metadata)
            _write_json(staging / "node_type_index.json", node_type_index)
            _fsync_tree(staging)
            final = root / f"v{version}"
            staging.rename(final)
            _fsync_dir(root)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _switch(model_path, name, version)
    logger.info("published pipeline %s version %d with %d new models", name, version, written)
    return final


def _fill(
    staging: Path,
    model_path: Path,
    name: str,
    models: Iterable[PublishedModel],
    given: dict[str, Any],
) -> tuple[int, int]:
    """The previous version's files plus ``models``; the new version number and model count."""
    previous = model_path / name
    if previous.is_dir():
        shutil.copytree(previous, staging, dirs_exist_ok=True, symlinks=False)
    metadata = _pipeline_metadata(staging, name, given)
    written = _write_models(staging, models)
    _write_model_tables(staging)
    version = max(list_versions(model_path, name), default=0) + 1
    metadata["version"] = version
    _write_json(staging / "metadata.json", metadata)
    return version, written


def switch_to(model_path: Path, name: str, version: int) -> None:
    """Serve ``version`` of pipeline ``name``: the link is replaced with one atomic rename."""
    with pipeline_lock(model_path, name):
        _switch(model_path, name, version)


def _switch(model_path: Path, name: str, version: int) -> None:
    target = versions_root(model_path, name) / f"v{version}"
    if not (target / "metadata.json").is_file():
        raise PipelineNotFoundError(f"pipeline {name} has no complete version {version}")
    _adopt_unversioned(model_path, name)
    temporary = model_path / f".{name}.link-{os.getpid()}"
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(Path(VERSIONS_DIR) / name / f"v{version}", target_is_directory=True)
    os.replace(temporary, model_path / name)
    _fsync_dir(model_path)


def _adopt_unversioned(model_path: Path, name: str) -> None:
    """Move a plain pipeline folder (copied in by hand) into the versions as the next one."""
    folder = model_path / name
    if folder.is_symlink() or not folder.is_dir():
        return
    version = max(list_versions(model_path, name), default=0) + 1
    folder.rename(versions_root(model_path, name) / f"v{version}")
    _switch(model_path, name, version)
    logger.info("adopted unversioned pipeline %s as version %d", name, version)


def _remove_leftovers(model_path: Path, name: str) -> None:
    """Mend what killed writers left (lock held): staging folders and temporary links are
    deleted, and a pipeline whose link is missing is served from its newest version again."""
    root = versions_root(model_path, name)
    for staging in root.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(staging, ignore_errors=True)
        logger.warning("removed %s, left by an interrupted publish of %s", staging, name)
    for link in model_path.glob(f".{name}.link-*"):
        link.unlink(missing_ok=True)
    _restore_link(model_path, name)


def _restore_link(model_path: Path, name: str) -> None:
    # Adopting a hand-copied folder renames it into the versions and then links it: a writer
    # killed between the two leaves versions with no link to any of them.
    if (model_path / name).is_symlink() or (model_path / name).exists():
        return
    complete = [v for v in list_versions(model_path, name) if _is_complete(model_path, name, v)]
    if complete:
        _switch(model_path, name, complete[-1])
        logger.warning("pipeline %s had no link; serving its version %d again", name, complete[-1])


def _is_complete(model_path: Path, name: str, version: int) -> bool:
    return (versions_root(model_path, name) / f"v{version}" / "metadata.json").is_file()


def _pipeline_metadata(staging: Path, name: str, given: dict[str, Any]) -> dict[str, Any]:
    existing: dict[str, Any] = {}
    if (staging / "metadata.json").is_file():
        existing = json.loads((staging / "metadata.json").read_text())
    timestamp = now_text()
    return {
        **existing,
        **given,
        "name": name,
        "init_time": existing.get("init_time", timestamp),
        "last_update_time": timestamp,
    }


def _write_models(staging: Path, models: Iterable[PublishedModel]) -> int:
    count = 0
    for published in models:
        folder = staging / published.source / published.output_type / published.feature_group
        folder.mkdir(parents=True, exist_ok=True)
        model = published.model
        (folder / f"{model.name}.zip").write_bytes(published.archive or model.to_archive())
        weights = model.weights()
        weight_file = folder / f"{model.name}.json"
        if weights is not None:
            _write_json(weight_file, weights)
        else:
            weight_file.unlink(missing_ok=True)
        count += 1
    return count


def _write_json(path: Path, body: Any) -> None:
    path.write_text(json.dumps(body, indent=1))


def read_zip_metadata(path: Path) -> dict[str, Any]:
    """``metadata.json`` of a model zip, reading nothing else (old zips hold pickles)."""
    with zipfile.ZipFile(path) as archive:
        return dict(json.loads(archive.read("metadata.json")))


def _write_model_tables(staging: Path) -> None:
    """One CSV per source and output type, a row per model, rebuilt from the archives."""
    for source_dir in sorted(p for p in staging.iterdir() if p.is_dir()):
        for output_dir in sorted(p for p in source_dir.iterdir() if p.is_dir()):
            rows = []
            for group_dir in sorted(p for p in output_dir.iterdir() if p.is_dir()):
                for archive in sorted(group_dir.glob("*.zip")):
                    rows.append(_table_row(read_zip_metadata(archive), group_dir.name))
            if rows:
                path = staging / f"{source_dir.name}_{output_dir.name}_model_metadata.csv"
                pl.DataFrame(rows, infer_schema_length=None).write_csv(path)


def _table_row(metadata: dict[str, Any], group: str) -> dict[str, Any]:
    row = {k: (str(v) if isinstance(v, list | dict) else v) for k, v in metadata.items()}
    row.setdefault("trainer", str(metadata.get("model_name", "")).rpartition("_")[0])
    row.setdefault("feature_group", group)
    return row


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder to disk before the version becomes visible."""
    for path in root.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
        elif path.is_dir():
            _fsync_dir(path)
    _fsync_dir(root)


def _fsync_dir(folder: Path) -> None:
    """Make renames and new names in ``folder`` durable."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def zip_pipeline(pipeline_dir: Path) -> bytes:
    """The whole pipeline folder as a zip, paths relative to it."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(pipeline_dir.resolve().rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(pipeline_dir.resolve()).as_posix())
    return buffer.getvalue()


def _require_versions(model_path: Path, name: str) -> None:
    """Refuse a name without versions before taking its lock (which would create its folder)."""
    if not list_versions(model_path, check_pipeline_name(name)):
        known = ", ".join(versioned_names(model_path)) or "none"
        raise PipelineNotFoundError(f"pipeline {name} has no published versions; known: {known}")


def rollback(model_path: Path, name: str, to: int | None = None) -> int:
    """Serve an earlier version again: ``to``, or the newest one before the current."""
    _require_versions(model_path, name)
    with pipeline_lock(model_path, name):
        versions = list_versions(model_path, name)
        current = current_version(model_path, name)
        if to is None:
            older = [v for v in versions if current is None or v < current]
            if not older:
                raise PipelineNotFoundError(f"pipeline {name} has no version before {current}")
            to = older[-1]
        if to not in versions:
            raise PipelineNotFoundError(f"pipeline {name} has no version {to}; has {versions}")
        _switch(model_path, name, to)
    logger.info("pipeline %s rolled back from version %s to %d", name, current, to)
    return to


def prune(model_path: Path, name: str, keep: int) -> list[int]:
    """Delete all but the newest ``keep`` versions; the served one is always kept."""
    if keep < 1:
        raise ValueError("keep must be at least 1")
    _require_versions(model_path, name)
    with pipeline_lock(model_path, name):
        _remove_leftovers(model_path, name)
        current = current_version(model_path, name)
        versions = list_versions(model_path, name)
        doomed = [v for v in versions[:-keep] if v != current]
        for version in doomed:
            shutil.rmtree(versions_root(model_path, name) / f"v{version}")
    if doomed:
        logger.info("pipeline %s: pruned versions %s", name, doomed)
    return doomed


def versioned_names(model_path: Path) -> list[str]:
    """Names of the pipelines that have versions under ``MODEL_PATH``."""
    root = model_path / VERSIONS_DIR
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _PIPELINE_NAME.match(p.name))


def published_pipelines(model_path: Path) -> list[PipelineVersions]:
    """Every pipeline under ``MODEL_PATH``, versioned or not, with what it serves."""
    names = set(versioned_names(model_path))
    if model_path.is_dir():
        names |= {
            p.name
            for p in model_path.iterdir()
            if not p.name.startswith(".") and (p / "metadata.json").is_file()
        }
    return [describe(model_path, name) for name in sorted(names)]


def describe(model_path: Path, name: str) -> PipelineVersions:
    """What pipeline ``name`` serves now and which versions it keeps."""
    folder = model_path / name
    metadata: dict[str, Any] = {}
    if (folder / "metadata.json").is_file():
        metadata = json.loads((folder / "metadata.json").read_text())
    return PipelineVersions(
        name=name,
        current=current_version(model_path, name),
        versions=list_versions(model_path, name),
        last_update_time=str(metadata.get("last_update_time", "")),
        model_count=len(list(folder.glob("*/*/*/*.zip"))) if folder.is_dir() else 0,
    )
