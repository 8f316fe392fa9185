"""``kepler-model up``, the main job, as a user runs it: a real process, real ports, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
from typer.testing import CliRunner

from kepler_model.cli import app
from tests.conftest import free_port

GO_CLIENT_BODY = {
    "metrics": ["cache_miss", "cpu_cycles", "cpu_instructions"],
    "output_type": "AbsPower",
    "source": "rapl-sysfs",
    "node_type": 1,
    "weight": True,
    "trainer_name": "SGDRegressorTrainer",
    "filter": "",
}


def wait_until_ready(url: str, process: subprocess.Popen[bytes], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, "kepler-model up exited early"
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} not ready after {seconds} s")


def ask_estimator(path: Path, rows: list[list[float]]) -> dict:
    request = {
        "metrics": GO_CLIENT_BODY["metrics"],
        "values": rows,
        "output_type": "DynPower",
        "source": "rapl-sysfs",
        "system_features": [],
        "system_values": [],
        "trainer_name": "",
        "filter": "",
    }
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(path))
        client.sendall(json.dumps(request).encode())
        return dict(json.loads(client.recv(4096)))


def test_up_trains_on_the_bundled_dump_serves_everything_and_stops_on_ctrl_c(
    tmp_path: Path,
) -> None:
    model_port, train_port = free_port(), free_port()
    sock = tmp_path / "estimator.sock"
    env = {
        **os.environ,
        "MODEL_SERVER_HOST": "127.0.0.1",
        "MODEL_SERVER_PORT": str(model_port),
        "TRAIN_API_HOST": "127.0.0.1",
        "TRAIN_API_PORT": str(train_port),
        "ESTIMATOR_SOCKET": str(sock),
        "CONFIG_PATH": str(tmp_path / "no-config"),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "kepler_model", "up"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until_ready(f"http://127.0.0.1:{model_port}/readyz", process, 240)
        wait_until_ready(f"http://127.0.0.1:{train_port}/healthz", process, 30)

        reply = httpx.post(f"http://127.0.0.1:{model_port}/model", json=GO_CLIENT_BODY)
        assert reply.status_code == 200, reply.text
        assert set(reply.json()) >= {"package", "dram"}

        answer = ask_estimator(sock, [[1e6, 1e9, 1e9], [0.0, 0.0, 0.0]])
        assert answer["msg"] == ""
        assert len(answer["powers"]["package"]) == 2
        assert (tmp_path / "models" / "kepler-default" / "metadata.json").is_file()
        children = psutil.Process(process.pid).children(recursive=True)
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output.decode()[-3000:]
    assert not sock.exists()
    # Training started Prefect's temporary API server; it must not outlive ``up``.
    assert children, "expected the temporary Prefect API server as a child process"
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"left running: {[c.cmdline() for c in alive]}"


def test_up_refuses_to_start_when_its_port_or_socket_is_taken(tmp_path: Path) -> None:
    sock = tmp_path / "estimator.sock"
    settings = {
        "MODEL_SERVER_HOST": "127.0.0.1",
        "MODEL_SERVER_PORT": str(free_port()),
        "TRAIN_API_HOST": "127.0.0.1",
        "TRAIN_API_PORT": str(free_port()),
        "ESTIMATOR_SOCKET": str(sock),
        "CONFIG_PATH": str(tmp_path / "no-config"),
        "MODEL_PATH": str(tmp_path / "models"),
    }
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", int(settings["TRAIN_API_PORT"])))
        taken.listen()
        result = CliRunner().invoke(app, ["up"], env=settings)
    assert result.exit_code == 1
    assert f"cannot start: train API port 127.0.0.1:{settings['TRAIN_API_PORT']}" in result.output

    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(sock))
        listener.listen()
        result = CliRunner().invoke(app, ["up"], env=settings)
    assert result.exit_code == 1
    assert f"cannot start: estimator socket: another process is listening on {sock}" in (
        result.output
    )
    assert not (tmp_path / "models").exists()  # refused before training
