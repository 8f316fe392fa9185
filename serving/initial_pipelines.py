"""Pipelines named by ``INITIAL_PIPELINE_URL``, fetched once at start-up (SPEC section 6).

Each entry of the comma list is a local pipeline folder, a local zip, or a ``file://``,
``http://`` or ``https://`` zip URL. Every entry is unpacked into its own folder under a
destination that the catalogue scans beside ``MODEL_PATH``. An entry that fails is logged and
skipped: one bad URL never leaves the server without the others.

Archives are checked member by member before anything is written (no absolute paths, no ``..``,
bounded size). Old published pipelines hold pickles; they are stored as bytes to be served,
never loaded.
"""

from __future__ import annotations

import io
import logging
import re
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import httpx

from modelling.archive import MAX_ARCHIVE_BYTES, UnsafeArchiveError, check_archive

logger = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_SECONDS = 60.0
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


class InitialPipelineError(RuntimeError):
    """One entry of ``INITIAL_PIPELINE_URL`` that could not be loaded, and why."""


def split_urls(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def load_initial_pipelines(
    urls: str,
    destination: Path,
    timeout: float = DOWNLOAD_TIMEOUT_SECONDS,
    max_bytes: int = MAX_ARCHIVE_BYTES,
) -> list[Path]:
    """Unpack every usable entry of ``urls`` under ``destination``; the folders written.

    ``max_bytes`` bounds each download and the unpacked size each archive declares.
    """
    destination.mkdir(parents=True, exist_ok=True)
    loaded = []
    for index, url in enumerate(split_urls(urls)):
        target = destination / folder_name(index, url)
        try:
            load_pipeline(url, target, timeout, max_bytes)
        except InitialPipelineError as exc:
            logger.warning("skipping initial pipeline %s: %s", url, exc)
            continue
        logger.info("loaded initial pipeline %s into %s", url, target)
        loaded.append(target)
    return loaded


def folder_name(index: int, url: str) -> str:
    """A plain, unique folder name from the URL's last path segment."""
    stem = Path(urlparse(url).path).name.removesuffix(".zip") or "pipeline"
    return f"{index:02d}-{_UNSAFE_NAME.sub('_', stem)}"


def load_pipeline(
    url: str,
    target: Path,
    timeout: float = DOWNLOAD_TIMEOUT_SECONDS,
    max_bytes: int = MAX_ARCHIVE_BYTES,
) -> None:
    """Fetch one entry and leave the pipeline (the folder with metadata.json) at ``target``."""
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        unpack_zip(download(url, timeout, max_bytes), target, max_bytes)
    elif parsed.scheme == "file":
        load_local(Path(url2pathname(parsed.path)), target, max_bytes)
    elif not parsed.scheme:
        load_local(Path(url), target, max_bytes)
    else:
        raise InitialPipelineError(f"unsupported URL scheme {parsed.scheme!r}")


def download(url: str, timeout: float, limit: int = MAX_ARCHIVE_BYTES) -> bytes:
    received = bytearray()
    try:
        with httpx.stream("GET", url, timeout=timeout, follow_redirects=True) as response:
            response.raise_for_status()
            for chunk in response.iter_bytes():
                received += chunk
                if len(received) > limit:
                    raise InitialPipelineError(f"download exceeds {limit} bytes")
    except httpx.HTTPError as exc:
        raise InitialPipelineError(f"download failed: {exc}") from exc
    return bytes(received)


def load_local(path: Path, target: Path, max_bytes: int = MAX_ARCHIVE_BYTES) -> None:
    if path.is_dir():
        _install(target, lambda staging: _copy_folder(path, staging))
        return
    try:
        if path.stat().st_size > max_bytes:
            raise InitialPipelineError(f"{path} is larger than {max_bytes} bytes")
        data = path.read_bytes()
    except OSError as exc:
        raise InitialPipelineError(f"cannot read {path}: {exc.strerror or exc}") from exc
    unpack_zip(data, target, max_bytes)


def unpack_zip(data: bytes, target: Path, max_bytes: int = MAX_ARCHIVE_BYTES) -> None:
    _install(target, lambda staging: _extract(data, staging, max_bytes))


def _copy_folder(source: Path, staging: Path) -> None:
    try:
        shutil.copytree(source, staging, dirs_exist_ok=True)
    except (OSError, shutil.Error) as exc:
        raise InitialPipelineError(f"cannot copy {source}: {exc}") from exc


def _extract(data: bytes, staging: Path, max_bytes: int) -> None:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = check_archive(archive, max_bytes, allow_pickles=True)
            archive.extractall(staging, members=members)
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise InitialPipelineError(f"not a readable zip archive: {exc}") from exc
    except UnsafeArchiveError as exc:
        raise InitialPipelineError(str(exc)) from exc


def _install(target: Path, fill: Callable[[Path], None]) -> None:
    """Fill a hidden staging folder, then move its pipeline to ``target`` in one rename."""
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        fill(staging)
        shutil.rmtree(target, ignore_errors=True)
        pipeline_root(staging).rename(target)
    except OSError as exc:
        raise InitialPipelineError(f"cannot install into {target}: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def pipeline_root(folder: Path) -> Path:
    """The folder holding metadata.json: ``folder`` itself or its single top-level folder."""
    if (folder / "metadata.json").is_file():
        return folder
    children = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if len(children) == 1 and (children[0] / "metadata.json").is_file():
        return children[0]
    raise InitialPipelineError("no metadata.json at the top level or in a single top folder")
