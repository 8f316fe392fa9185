"""``kepler-model train`` refuses what it cannot train with one line, before any work."""

from __future__ import annotations

import socket
from pathlib import Path

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
