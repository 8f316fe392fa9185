"""prefect.yaml against a real local Prefect server: deploy everything, run ingest via a worker.

Everything runs as the README says an operator would: ``prefect server start``, ``prefect
work-pool create``, ``prefect deploy --all`` from the repository root, ``prefect worker start``
and ``prefect deployment run``, each a subprocess with its own PREFECT_HOME. The scheduler
service is off so that the online-training schedule starts no run of its own during the test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from storage.samples import SampleStore
from tests.conftest import free_port
from tests.prometheus_server import PrometheusServer, backfilled_server, load_dump

ROOT = Path(__file__).resolve().parent.parent
DUMP_START, DUMP_END = 1_695_361_425, 1_695_361_986
POOL = "kepler-local"

pytestmark = pytest.mark.skipif(shutil.which("prefect") is None, reason="prefect CLI not found")


@contextmanager
def background(command: list[str], env: dict[str, str], log: Path) -> Iterator[None]:
    """A long-running command in its own process group, ended with its group."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield
    finally:
        _end_group(process)


def _end_group(process: subprocess.Popen[bytes]) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def prefect(env: dict[str, str], *arguments: str, timeout: float = 120) -> str:
    done = subprocess.run(
        ["prefect", *arguments],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"prefect {' '.join(arguments)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def wait_healthy(api: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"no Prefect server at {api} after {timeout} s")


@pytest.fixture(scope="module")
def prometheus(
    tmp_path_factory: pytest.TempPathFactory, workload_dump: Path
) -> Iterator[PrometheusServer]:
    root = tmp_path_factory.mktemp("prometheus")
    with backfilled_server(root, [load_dump(workload_dump)]) as server:
        yield server


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, str], Path]]:
    """A Prefect server with the work pool and every deployment of prefect.yaml."""
    root = tmp_path_factory.mktemp("prefect")
    port = free_port()
    env = _prefect_env(root, port)
    server = ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with background(server, env, root / "server.log"):
        wait_healthy(env["PREFECT_API_URL"])
        prefect(env, "work-pool", "create", POOL, "--type", "process")
        before = (ROOT / "prefect.yaml").read_bytes()
        prefect(env, "--no-prompt", "deploy", "--all")
        assert (ROOT / "prefect.yaml").read_bytes() == before
        yield env, root


def _prefect_env(root: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PWD=str(ROOT),  # prefect.yaml's pull step runs flows from {{ $PWD }}
        PREFECT_HOME=str(root / "home"),
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
        PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="1",
        # Anything a flow run falls back to stays in the test's directory.
        DUCKDB_PATH=str(root / "default.duckdb"),
        MODEL_PATH=str(root / "models"),
        CONFIG_PATH=str(root / "no-config"),
    )
    return env


def deployments(env: dict[str, str]) -> dict[str, dict[str, Any]]:
    api = env["PREFECT_API_URL"]
    reply = httpx.post(f"{api}/deployments/filter", json={}, timeout=10)
    reply.raise_for_status()
    return {d["name"]: d for d in reply.json()}


def test_deploy_all_creates_the_three_deployments(deployed) -> None:
    env, _ = deployed
    found = deployments(env)

    assert set(found) == {"offline-training", "online-training", "ingest"}
    assert {d["work_pool_name"] for d in found.values()} == {POOL}


def test_online_training_runs_every_sampling_interval(deployed) -> None:
    env, _ = deployed
    online = deployments(env)["online-training"]

    assert [s["schedule"]["interval"] for s in online["schedules"]] == [300.0]
    assert all(s["active"] for s in online["schedules"])
    assert online["global_concurrency_limit"]["limit"] == 1  # runs never overlap
    assert online["entrypoint"] == "flows/online_training.py:online_training"


def test_deployment_run_of_ingest_completes_through_a_worker(
    deployed, prometheus: PrometheusServer
) -> None:
    env, root = deployed
    db = root / "ingested.duckdb"
    parameters = {
        "prometheus": prometheus.url,
        "db_path": str(db),
        "start": DUMP_START,
        "end": DUMP_END,
        "metrics": ["kepler_node_package_joules_total"],
    }
    options = [f"--param={key}={json.dumps(value)}" for key, value in parameters.items()]

    with background(["prefect", "worker", "start", "--pool", POOL], env, root / "worker.log"):
        output = prefect(
            env,
            "deployment",
            "run",
            "ingest/ingest",
            *options,
            "--watch",
            "--watch-timeout",
            "150",
            timeout=200,
        )

    assert "Completed" in output
    with SampleStore(db) as store:
        assert store.count_samples() == 4 * 188  # 4 package series, 188 samples each
        assert set(store.watermarks(prometheus.url).values()) == {float(DUMP_END)}


def test_served_deployments_run_online_training_every_sampling_interval(deployed) -> None:
    # Last in this file: serving re-registers online-training with its own schedule.
    env, root = deployed
    command = ["kepler-model", "flows", "--sampling-interval", "120"]

    with background(command, env, root / "flows.log"):
        deadline = time.monotonic() + 90
        intervals: list[float] = []
        while time.monotonic() < deadline and intervals != [120.0]:
            time.sleep(1)
            schedules = deployments(env)["online-training"]["schedules"]
            intervals = [s["schedule"]["interval"] for s in schedules]

    assert intervals == [120.0], (root / "flows.log").read_text()[-3000:]
    assert deployments(env)["online-training"]["global_concurrency_limit"]["limit"] == 1
