"""Peak memory of the train API answering one ``POST /train`` with a ~100 MB workload dump.

The dump is the bundled 2023 Kepler dump replicated back to back in time (counters carried on,
so they keep increasing) until its JSON reaches the asked size. The train API runs in its own
process, as deployed; the figure is that process's peak resident set size (Linux ``VmHWM``)
while it receives, parses, trains on and answers the request, next to its resident size just
before (after a small warm-up request, so that imports and the Prefect client are counted in
the baseline, not in the request). The body is sent gzipped, as Kepler's tooling sends it.

Two requests are measured, each by a fresh server: one naming an unknown trainer after the
dump, which the API refuses (422) once it has received and read the whole body, so its peak is
the cost of taking the body in; and the real one, whose peak adds the training flow (ingest,
extraction, fits).

    python benchmarks/train_api_memory.py [--megabytes 100] [--trainer SGDRegressorTrainer]
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
BUNDLED_DUMP = ROOT / "kepler_model" / "data" / "kepler_workload_2023.json.gz"
STEP_SECONDS = 3.0


@dataclass(frozen=True)
class Body:
    path: Path
    json_bytes: int
    gzip_bytes: int
    samples: int


@dataclass(frozen=True)
class Peak:
    status: int
    seconds: float
    baseline_kib: int
    peak_kib: int

    def line(self, what: str) -> str:
        return (
            f"{what:<34} {self.status}  {self.seconds:6.1f} s  RSS before "
            f"{self.baseline_kib / 1024:5.0f} MiB, peak {self.peak_kib / 1024:5.0f} MiB, "
            f"growth {(self.peak_kib - self.baseline_kib) / 1024:5.0f} MiB"
        )


def load_bundled() -> dict[str, Any]:
    with gzip.open(BUNDLED_DUMP) as handle:
        return dict(json.load(handle))


def time_span(dump: dict[str, Any]) -> float:
    stamps = [float(v[0]) for result in dump.values() for s in result for v in s["values"]]
    return max(stamps) - min(stamps) + STEP_SECONDS


def replicated_series(series: dict[str, Any], copies: int, span: float, counter: bool) -> Any:
    """One series repeated ``copies`` times, each copy ``span`` seconds later."""
    values = series["values"]
    last = float(values[-1][1]) if values and counter else 0.0
    shifted = [
        [float(ts) + k * span, repr(float(v) + k * last)] for k in range(copies) for ts, v in values
    ]
    return {"metric": series["metric"], "values": shifted}


def replicated_dump(dump: dict[str, Any], copies: int) -> dict[str, Any]:
    span = time_span(dump)
    return {
        metric: [replicated_series(s, copies, span, metric.endswith("_total")) for s in result]
        for metric, result in dump.items()
    }


def make_dump(megabytes: float) -> dict[str, Any]:
    """The bundled dump replicated until its JSON is about ``megabytes`` MB."""
    bundled = load_bundled()
    one, two = (len(json.dumps(replicated_dump(bundled, k))) for k in (1, 2))
    per_copy = two - one  # the labels are written once per series, the samples per copy
    return replicated_dump(bundled, max(1, round((megabytes * 1e6 - one) / per_copy) + 1))


def write_body(path: Path, dump: dict[str, Any], trainer: str) -> Body:
    """A gzipped train request; the trainer is named after the dump, as the body's last field."""
    trainers = {"abs_trainers": [trainer], "dyn_trainers": [trainer]}
    text = json.dumps({"name": "memory-bench", "prom_response": dump, "trainer": trainers})
    samples = sum(len(s["values"]) for result in dump.values() for s in result)
    with gzip.open(path, "wt", compresslevel=3) as out:
        out.write(text)
    return Body(path, len(text), path.stat().st_size, samples)


def small_body(trainer: str) -> bytes:
    trainers = {"abs_trainers": [trainer], "dyn_trainers": [trainer]}
    body = {"name": "warm-up", "trainer": trainers, "prom_response": load_bundled()}
    return gzip.compress(json.dumps(body).encode())


def serve(model_path: Path, port: int) -> None:
    """The server process: the train API as ``kepler-model train-api`` runs it."""
    sys.path.insert(0, str(ROOT))
    import uvicorn

    from kepler_model.settings import Settings
    from serving.train_api import create_train_app

    settings = Settings(model_path=model_path, train_api_port=port)
    uvicorn.run(create_train_app(settings), host="127.0.0.1", port=port, log_level="warning")


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(model_path: Path, port: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, __file__, "--serve", str(port), "--model-path", str(model_path)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("train API did not start within 60 s")


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise SystemExit(f"/proc/{pid}/status has no {field}")


def reset_peak(pid: int) -> None:
    """Linux: writing 5 to clear_refs sets the peak RSS back to the current RSS."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def chunks(path: Path, size: int = 1 << 20) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while block := handle.read(size):
            yield block


def post(url: str, content: Any, expected: int = 200) -> httpx.Response:
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    reply = httpx.post(f"{url}/train", content=content, headers=headers, timeout=1800)
    if reply.status_code != expected:
        raise SystemExit(f"train API answered {reply.status_code}: {reply.text[:500]}")
    return reply


def measured_post(url: str, pid: int, body: Path, expected: int) -> Peak:
    """One request, with the server's RSS just before and its peak while answering."""
    baseline = status_kib(pid, "VmRSS")
    reset_peak(pid)
    started = time.perf_counter()
    reply = post(url, chunks(body), expected)
    seconds = time.perf_counter() - started
    return Peak(reply.status_code, seconds, baseline, status_kib(pid, "VmHWM"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=100.0, help="JSON size of the dump")
    parser.add_argument("--trainer", default="SGDRegressorTrainer")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model-path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.model_path, args.serve)
        return

    folder = Path(tempfile.mkdtemp(prefix="train-api-memory-"))
    try:
        measure(folder, args.megabytes, args.trainer)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def measure(folder: Path, megabytes: float, trainer: str) -> None:
    dump = make_dump(megabytes)
    body = write_body(folder / "body.json.gz", dump, trainer)
    refused = write_body(folder / "refused.json.gz", dump, "NoSuchTrainer")
    del dump
    print(
        f"dump: {body.samples} samples; request JSON {body.json_bytes / 1e6:.1f} MB "
        f"({body.json_bytes / 2**20:.0f} MiB), gzipped {body.gzip_bytes / 1e6:.1f} MB"
    )
    warm_up = small_body(trainer)
    taken_in = measure_fresh(folder, warm_up, refused.path, 422)
    print(taken_in.line("receive + read (refused after)"))
    trained = measure_fresh(folder, warm_up, body.path, 200)
    print(trained.line(f"receive + read + train ({trainer})"))


def measure_fresh(folder: Path, warm_up: bytes, body: Path, expected: int) -> Peak:
    """One measured request to a server that has answered only the warm-up request."""
    port = free_port()
    server = start_server(folder / "models", port)
    url = f"http://127.0.0.1:{port}"
    try:
        post(url, warm_up)
        return measured_post(url, server.pid, body, expected)
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
