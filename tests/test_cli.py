"""``kepler-model train`` refuses what it cannot train with one line, before any work."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from kepler_model.cli import app

REFUSED = [
    (["--abs-trainers", "SGDRegresorTrainer"], "--abs-trainers", "SGDRegresorTrainer"),
    (["--dyn-trainers", "SGDRegressorTrainer,Nope"], "--dyn-trainers", "Nope"),
    (["--isolator", "NopeIsolator"], "--isolator", "unknown isolator"),
    (["--isolator", "TrainIsolator"], "--idle", "needs an idle run"),
    (["--energy-source", "solar"], "--energy-source", "unknown energy source"),
    (["--pipeline", "../escape"], "--pipeline", "escape"),
]


@pytest.mark.parametrize(("flags", "option", "words"), REFUSED, ids=[r[2] for r in REFUSED])
def test_train_refuses_unknown_names_before_training(
    tmp_path: Path, workload_dump: Path, flags: list[str], option: str, words: str
) -> None:
    models = tmp_path / "models"
    command = ["train", "--input", str(workload_dump), "--model-path", str(models), *flags]

    result = CliRunner().invoke(app, [*command, "--db", str(tmp_path / "s.duckdb")])

    assert result.exit_code == 2, result.output
    assert option in result.output and words in result.output
    assert not models.exists() and not (tmp_path / "s.duckdb").exists()


@pytest.mark.usefixtures("prefect_harness")
def test_train_on_a_file_that_is_not_a_dump_fails_with_one_line(tmp_path: Path) -> None:
    text = tmp_path / "notes.json"
    text.write_text("these are not metrics\n")
    command = ["train", "--input", str(text), "--model-path", str(tmp_path / "models")]

    result = CliRunner().invoke(app, [*command, "--db", str(tmp_path / "s.duckdb")])

    assert result.exit_code == 1
    assert "training failed:" in result.output and "a dump is a JSON object" in result.output
    assert not (tmp_path / "models").exists()


def test_ingest_from_a_server_that_is_not_there_fails_at_once(tmp_path: Path) -> None:
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    db = tmp_path / "s.duckdb"

    result = CliRunner().invoke(app, ["ingest", "--prometheus", url, "--db", str(db)])

    assert result.exit_code == 1
    assert f"ingest failed: {url} does not answer" in result.output
    assert not db.exists()


def test_sigterm_during_training_stops_the_prefect_server_it_started(
    tmp_path: Path, workload_dump: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    command = [sys.executable, "-m", "kepler_model", "train", "--input", str(workload_dump)]
    command += ["--model-path", str(tmp_path / "models"), "--db", str(tmp_path / "s.duckdb")]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    children: list[psutil.Process] = []
    while not children and time.monotonic() < deadline and process.poll() is None:
        children = psutil.Process(process.pid).children(recursive=True)
        time.sleep(0.1)

    process.terminate()
    _, errors = process.communicate(timeout=60)

    assert children, "expected the temporary Prefect API server as a child process"
    assert process.returncode == 128 + signal.SIGTERM
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, errors.decode()[-2000:]


@pytest.mark.usefixtures("prefect_harness")
def test_train_that_publishes_nothing_exits_non_zero(tmp_path: Path) -> None:
    times = [1_700_000_000 + 3 * i for i in range(5)]
    dump = {
        "kepler_node_package_joules_total": [
            {"metric": {"source": "rapl"}, "values": [[t, str(9 * t)] for t in times]}
        ],
        "kepler_container_cpu_cycles_total": [
            {"metric": {"container_id": "a"}, "values": [[t, "NaN"] for t in times]}
        ],
    }
    path = tmp_path / "nan.json"
    path.write_text(json.dumps(dump))
    command = ["train", "--input", str(path), "--model-path", str(tmp_path / "models")]

    result = CliRunner().invoke(app, [*command, "--db", str(tmp_path / "s.duckdb")])

    assert result.exit_code == 1
    assert "nothing was published" in result.output
    assert not (tmp_path / "models" / "kepler-default").exists()


@pytest.mark.usefixtures("prefect_harness")
def test_train_takes_the_profile_that_the_profile_command_wrote(
    tmp_path: Path, workload_dump: Path, idle_dump: Path
) -> None:
    profiled = CliRunner().invoke(
        app, ["profile", "--input", str(idle_dump), "--output", str(tmp_path / "idle")]
    )
    assert profiled.exit_code == 0, profiled.output
    command = ["train", "--input", str(workload_dump), "--profile", str(tmp_path / "idle")]
    command += ["--isolator", "ProfileBackgroundIsolator", "--abs-trainers", "SGDRegressorTrainer"]
    command += ["--dyn-trainers", "SGDRegressorTrainer", "--pipeline", "profiled"]

    result = CliRunner().invoke(
        app, [*command, "--model-path", str(tmp_path / "models"), "--db", str(tmp_path / "s.db")]
    )

    assert result.exit_code == 0, result.output
    metadata = json.loads((tmp_path / "models" / "profiled" / "metadata.json").read_text())
    assert metadata["isolator"] == "profile"
    assert (tmp_path / "models/profiled/rapl-sysfs/DynPower/CounterOnly").is_dir()
