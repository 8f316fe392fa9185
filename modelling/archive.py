"""Reading and writing model zips without trusting them.

Every member is checked before anything is read: its path must stay inside the archive's
folder, the total unpacked size is bounded, and pickles are refused by name.
"""

from __future__ import annotations

import io
import zipfile
import zlib
from pathlib import PurePosixPath, PureWindowsPath

MAX_ARCHIVE_BYTES = 256 * 1024 * 1024
MAX_MEMBERS = 10_000
PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib")


class UnsafeArchiveError(ValueError):
    """An archive that is truncated, too large, escapes its folder or holds pickles."""


def check_member_name(name: str) -> None:
    """Refuse absolute paths, drive letters and ``..`` components."""
    posix = PurePosixPath(name)
    windows = PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive:
        raise UnsafeArchiveError(f"archive member {name!r} has an absolute path")
    if ".." in posix.parts or ".." in windows.parts:
        raise UnsafeArchiveError(f"archive member {name!r} escapes the archive folder")


def check_archive(
    archive: zipfile.ZipFile, max_bytes: int = MAX_ARCHIVE_BYTES, allow_pickles: bool = False
) -> list[zipfile.ZipInfo]:
    """The archive's file members, after checking every one of them."""
    members = archive.infolist()
    if len(members) > MAX_MEMBERS:
        raise UnsafeArchiveError(f"archive has {len(members)} members, more than {MAX_MEMBERS}")
    total = 0
    for member in members:
        check_member_name(member.filename)
        if not allow_pickles and member.filename.lower().endswith(PICKLE_SUFFIXES):
            raise UnsafeArchiveError(
                f"archive member {member.filename!r} is a pickle; pickles are never loaded"
            )
        total += member.file_size
        if total > max_bytes:
            raise UnsafeArchiveError(f"archive unpacks to more than {max_bytes} bytes")
    return [m for m in members if not m.is_dir()]


def read_archive(data: bytes, max_bytes: int = MAX_ARCHIVE_BYTES) -> dict[str, bytes]:
    """All members of a zip held in memory, by name, after the safety checks."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = check_archive(archive, max_bytes)
            return {m.filename: archive.read(m) for m in members}
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise UnsafeArchiveError(f"not a readable zip archive: {exc}") from exc


def read_archive_json_members(data: bytes) -> dict[str, bytes]:
    """The JSON members of an archive that may hold pickles (old published models).

    The pickles are neither read nor returned; only the metadata and component maps are.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = check_archive(archive, allow_pickles=True)
            return {m.filename: archive.read(m) for m in members if m.filename.endswith(".json")}
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise UnsafeArchiveError(f"not a readable zip archive: {exc}") from exc


def write_archive(files: dict[str, bytes]) -> bytes:
    """A deflated zip of ``files``, members in a stable order."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(files):
            check_member_name(name)
            archive.writestr(name, files[name])
    return buffer.getvalue()
