"""A machine's spec (SPEC section 8): what node types are made of, and how to read it here.

A spec has ``processor`` (normalised name), ``cores`` (logical CPUs), ``chips`` (distinct
physical sockets), ``memory`` (GiB) and ``frequency`` (maximum MHz). An empty, zero or missing
attribute is unknown. The parsers take file contents, so that saved ``/proc`` files test them;
``discover_machine_spec`` reads this machine's files.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

NUMERIC_ATTRIBUTES: tuple[str, ...] = ("cores", "chips", "memory", "frequency")
ATTRIBUTES: tuple[str, ...] = ("processor", *NUMERIC_ATTRIBUTES)

PROC = Path("/proc")
SYS_CPU = Path("/sys/devices/system/cpu")
KIB_PER_GIB = 1024 * 1024

# Keys that name the processor in /proc/cpuinfo, most specific first (x86, then ARM and POWER).
_NAME_KEYS = ("model name", "Processor", "cpu model", "cpu")
_MARKS = re.compile(r"\((?:r|tm|c)\)|[®™©]")
_FREQUENCY = re.compile(r"@?\s*\d+(?:\.\d+)?\s*[gm]hz")
_FILLER = frozenset({"cpu", "processor"})
_CORE_COUNT = re.compile(r"^\d+-core$")
_VERSION = re.compile(r"^v\d+$")


class MachineSpecError(ValueError):
    """A spec file or mapping whose attributes have the wrong type."""


@dataclass(frozen=True)
class MachineSpec:
    """One machine's attributes; ``""`` and ``0`` mean unknown. Hashable, so queries can be keys."""

    processor: str = ""
    cores: float = 0.0
    chips: float = 0.0
    memory: float = 0.0
    frequency: float = 0.0

    @classmethod
    def from_mapping(cls, attrs: Mapping[str, Any]) -> MachineSpec:
        """A spec from JSON-like attributes; the processor name is normalised, extras ignored."""
        processor = attrs.get("processor") or ""
        if not isinstance(processor, str):
            raise MachineSpecError(f"processor is a name, not {processor!r}")
        numbers = {name: _number(name, attrs.get(name)) for name in NUMERIC_ATTRIBUTES}
        return cls(processor=normalise_processor(processor), **numbers)

    def known(self) -> tuple[str, ...]:
        """Names of the attributes that are known, in ``ATTRIBUTES`` order."""
        return tuple(name for name in ATTRIBUTES if getattr(self, name))

    @property
    def complete(self) -> bool:
        return len(self.known()) == len(ATTRIBUTES)

    def to_dict(self) -> dict[str, Any]:
        """All five attributes as in ``node_type_index.json``; whole numbers as ints."""
        body: dict[str, Any] = {"processor": self.processor}
        for name in NUMERIC_ATTRIBUTES:
            value = float(getattr(self, name))
            body[name] = int(value) if value.is_integer() else value
        return body


def _number(name: str, value: Any) -> float:
    if value is None or value == "":
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MachineSpecError(f"{name} is a number, not {value!r}")
    if not math.isfinite(value) or value < 0:
        raise MachineSpecError(f"{name} is a finite number of at least 0, not {value!r}")
    return float(value)


def normalise_processor(name: str) -> str:
    """``Intel(R) Xeon(R) CPU E5-2686 v4 @ 2.30GHz`` -> ``intel_xeon_e5_2686v4``.

    Lower case; vendor marks, frequency, and the words CPU, Processor and ``N-Core`` removed;
    a version token (``v4``) joins the token before it; the rest joined by ``_``. Normalising a
    normalised name changes nothing.
    """
    text = _FREQUENCY.sub(" ", _MARKS.sub(" ", name.lower()))
    words = [w for w in text.split() if w not in _FILLER and not _CORE_COUNT.match(w)]
    tokens: list[str] = []
    for token in re.split(r"[^a-z0-9]+", " ".join(words)):
        if not token:
            continue
        if _VERSION.match(token) and tokens:
            tokens[-1] += token
        else:
            tokens.append(token)
    return "_".join(tokens)


@dataclass(frozen=True)
class CpuInfo:
    """What /proc/cpuinfo says; ``chips`` is 0 when it names no physical ids."""

    processor: str
    cores: int
    chips: int


def parse_cpuinfo(text: str) -> CpuInfo:
    """Processor name, logical CPUs and distinct physical ids of a /proc/cpuinfo text."""
    blocks = [_fields(block) for block in re.split(r"\n\s*\n", text) if block.strip()]
    cpus = [b for b in blocks if "processor" in b and b["processor"].isdigit()]
    sockets = {b["physical id"] for b in cpus if "physical id" in b}
    return CpuInfo(_processor_name(blocks), len(cpus), len(sockets))


def _fields(block: str) -> dict[str, str]:
    fields = {}
    for line in block.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def _processor_name(blocks: list[dict[str, str]]) -> str:
    for key in _NAME_KEYS:
        for block in blocks:
            value = block.get(key, "")
            # On ARM "processor" holds the CPU number and "Processor" the name.
            if value and not value.isdigit():
                return value
    return ""


def parse_meminfo(text: str) -> float:
    """MemTotal of a /proc/meminfo text in whole GiB, as the published node types count it."""
    match = re.search(r"^MemTotal:\s+(\d+)\s*kB", text, re.MULTILINE)
    return float(round(int(match.group(1)) / KIB_PER_GIB)) if match else 0.0


def max_frequency_mhz(khz_values: Iterable[str]) -> float:
    """The highest of the ``cpuinfo_max_freq`` values (kHz) in MHz; 0 when there are none."""
    values = [int(v) for v in (text.strip() for text in khz_values) if v.isdigit()]
    return float(round(max(values) / 1000)) if values else 0.0


def count_packages(package_ids: Iterable[str]) -> int:
    """Distinct ``topology/physical_package_id`` values; a negative id says nothing."""
    return len({v.strip() for v in package_ids if v.strip() and not v.strip().startswith("-")})


def discover_machine_spec(proc: Path = PROC, sys_cpu: Path = SYS_CPU) -> MachineSpec:
    """This machine's spec from /proc and sysfs; what cannot be read stays unknown."""
    cpuinfo = parse_cpuinfo(_read(proc / "cpuinfo"))
    chips = cpuinfo.chips or count_packages(
        _read_all(sys_cpu.glob("cpu[0-9]*/topology/physical_package_id"))
    )
    spec = MachineSpec(
        processor=normalise_processor(cpuinfo.processor),
        cores=float(cpuinfo.cores or os.cpu_count() or 0),
        chips=float(chips),
        memory=parse_meminfo(_read(proc / "meminfo")) or _sysconf_memory_gib(),
        frequency=max_frequency_mhz(_read_all(sys_cpu.glob("cpu[0-9]*/cpufreq/cpuinfo_max_freq"))),
    )
    unknown = sorted(set(ATTRIBUTES) - set(spec.known()))
    logger.info("machine spec %s; unknown: %s", spec.to_dict(), ", ".join(unknown) or "none")
    return spec


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError as exc:
        logger.info("cannot read %s: %s", path, exc.strerror or exc)
        return ""


def _read_all(paths: Iterable[Path]) -> list[str]:
    return [_read(path) for path in paths]


def _sysconf_memory_gib() -> float:
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0.0
    return float(round(pages * page_size / 1024**3)) if pages > 0 and page_size > 0 else 0.0
