"""A real Prometheus for the tests, holding saved dumps backfilled with promtool.

Dumps are written as OpenMetrics text (families sorted, samples in time order, counters typed
with their ``_total`` samples, label values escaped, timestamps in seconds, ``# EOF`` last),
turned into TSDB blocks by ``promtool tsdb create-blocks-from openmetrics``, and served by
``prometheus`` on 127.0.0.1 with a retention long enough to keep 2023 data.

Backfilled series carry no staleness markers, so Prometheus' default 5-minute look-back would
repeat a series' last value at every step after it ended. The server looks back one second
only: a grid time then has a value exactly when a sample sits on it, as in the dump.
"""

from __future__ import annotations

import gzip
import json
import math
import shutil
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TextIO

import httpx

from tests.conftest import free_port

CONFIG = "global:\n  scrape_interval: 1h\n"


class PrometheusNotReadyError(RuntimeError):
    """The server did not answer ``/-/ready`` in time."""


def write_openmetrics(dump: Mapping[str, list[dict[str, Any]]], stream: TextIO) -> int:
    """Write a dump (metric -> ``result`` array) as OpenMetrics; returns the sample count."""
    written = 0
    for metric in sorted(dump):
        family, kind = _family(metric)
        stream.write(f"# TYPE {family} {kind}\n")
        for entry in sorted(dump[metric], key=lambda e: _label_text(e.get("metric", {}))):
            labels = _label_text(entry.get("metric", {}))
            for timestamp, value in sorted(entry["values"], key=lambda pair: float(pair[0])):
                stream.write(f"{metric}{labels} {_number(value)} {float(timestamp):.3f}\n")
                written += 1
    stream.write("# EOF\n")
    return written


def _family(metric: str) -> tuple[str, str]:
    if metric.endswith("_total"):
        return metric.removesuffix("_total"), "counter"
    return metric, "gauge"


def _label_text(labels: Mapping[str, str]) -> str:
    pairs = [f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()) if k != "__name__"]
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: Any) -> str:
    number = float(value)
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "+Inf" if number > 0 else "-Inf"
    return repr(number)


def backfill(dumps: Iterable[Mapping[str, list[dict[str, Any]]]], data_dir: Path) -> int:
    """Write each dump into TSDB blocks under ``data_dir``; returns the samples written."""
    data_dir.mkdir(parents=True, exist_ok=True)
    total = 0
    for index, dump in enumerate(dumps):
        text_file = data_dir.parent / f"backfill-{index}.om"
        with text_file.open("w", encoding="utf-8") as stream:
            total += write_openmetrics(dump, stream)
        command = ["promtool", "tsdb", "create-blocks-from", "openmetrics"]
        subprocess.run([*command, str(text_file), str(data_dir)], check=True, capture_output=True)
        text_file.unlink()
    return total


class PrometheusServer:
    """``prometheus`` serving ``data_dir`` on 127.0.0.1:``port``; stop and start at will."""

    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir = data_dir
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._config = data_dir.parent / "prometheus.yml"
        self._config.write_text(CONFIG)
        self._log = data_dir.parent / "prometheus.log"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        if self._process is not None:
            return
        with self._log.open("ab") as log:
            self._process = subprocess.Popen(self._command(), stdout=log, stderr=log)
        self._wait_ready(timeout)

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def __enter__(self) -> PrometheusServer:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _command(self) -> list[str]:
        return [
            shutil.which("prometheus") or "prometheus",
            f"--config.file={self._config}",
            f"--storage.tsdb.path={self.data_dir}",
            "--storage.tsdb.retention.time=100y",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--query.lookback-delta=1s",
        ]

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise PrometheusNotReadyError(f"prometheus exited; see {self._log}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise PrometheusNotReadyError(f"prometheus not ready after {timeout} s; see {self._log}")


def load_dump(path: Path) -> dict[str, list[dict[str, Any]]]:
    with gzip.open(path, "rt", encoding="utf-8") as stream:
        return dict(json.load(stream))


def backfilled_server(root: Path, dumps: Iterable[Mapping[str, Any]]) -> PrometheusServer:
    """A stopped server whose TSDB under ``root`` holds ``dumps``; start it (or use ``with``)."""
    backfill(dumps, root / "data")
    return PrometheusServer(root / "data", free_port())
