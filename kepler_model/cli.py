"""``kepler-model``: train, serve and run everything from one command line.

Flags override settings, which come from CONFIG_PATH files and the environment.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from kepler_model.settings import Settings, load_settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


def _split(names: str | None) -> list[str] | None:
    return [n.strip() for n in names.split(",") if n.strip()] if names else None


def _configure_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def run_training(
    settings: Settings,
    dump: Path,
    pipeline: str,
    energy_source: str = "rapl-sysfs",
    abs_trainers: list[str] | None = None,
    dyn_trainers: list[str] | None = None,
    isolator: str = "MinIdleIsolator",
    idle: Path | None = None,
    node_type: int = 0,
    machine_spec: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the offline-training flow on the configured task runner; returns its report."""
    from flows.offline_training import offline_training
    from flows.runners import make_task_runner

    runner = make_task_runner(settings.task_runner, settings.dask_address)
    report: dict[str, Any] = offline_training.with_options(task_runner=runner)(
        input=str(dump),
        pipeline=pipeline,
        energy_source=energy_source,
        abs_trainers=abs_trainers,
        dyn_trainers=dyn_trainers,
        isolator=isolator,
        idle=str(idle) if idle else None,
        model_path=str(settings.model_path),
        db_path=str(settings.duckdb_path),
        node_type=node_type,
        machine_spec=machine_spec,
        thirdparty_metrics=list(settings.thirdparty_metrics),
    )
    return report


def print_report(report: dict[str, Any]) -> None:
    typer.echo(f"pipeline {report['pipeline']} version {report['version']} at {report['path']}")
    typer.echo(f"{'output':9} {'group':20} {'trainer':34} {'MAE (W)':>9} {'MAPE %':>8}")
    for row in sorted(report["models"], key=lambda m: (m["output_type"], m["feature_group"])):
        typer.echo(
            f"{row['output_type']:9} {row['feature_group']:20} {row['model_name']:34} "
            f"{row['mae']:9.3f} {row['mape']:8.2f}"
        )
    for failure in report["failures"]:
        typer.echo(f"failed: {failure}")
    for group, reason in report["skipped_groups"].items():
        typer.echo(f"skipped {group}: {reason}")


@app.command()
def train(
    input: Annotated[Path, typer.Option("--input", help="Prometheus dump (.json or .json.gz)")],
    pipeline: Annotated[str, typer.Option(help="pipeline name to publish")] = "kepler-default",
    energy_source: Annotated[str, typer.Option(help="energy source to model")] = "rapl-sysfs",
    abs_trainers: Annotated[
        str | None, typer.Option(help="comma list of AbsPower trainers")
    ] = None,
    dyn_trainers: Annotated[
        str | None, typer.Option(help="comma list of DynPower trainers")
    ] = None,
    isolator: Annotated[str, typer.Option(help="isolator for DynPower")] = "MinIdleIsolator",
    idle: Annotated[Path | None, typer.Option(help="dump of an idle run")] = None,
    node_type: Annotated[int, typer.Option(help="node type of the data's machine")] = 0,
    model_path: Annotated[Path | None, typer.Option(help="MODEL_PATH override")] = None,
    db: Annotated[Path | None, typer.Option(help="DUCKDB_PATH override")] = None,
) -> None:
    """Train on a dump and publish the pipeline."""
    _configure_logging()
    if not input.is_file():
        raise typer.BadParameter(f"{input} is not a file", param_hint="--input")
    settings = load_settings(model_path=model_path, duckdb_path=db)
    started = time.perf_counter()
    report = run_training(
        settings,
        input,
        pipeline,
        energy_source,
        _split(abs_trainers),
        _split(dyn_trainers),
        isolator,
        idle,
        node_type,
    )
    print_report(report)
    typer.echo(f"trained in {time.perf_counter() - started:.1f} s")


@app.command()
def serve(
    model_path: Annotated[Path | None, typer.Option(help="MODEL_PATH override")] = None,
    port: Annotated[int | None, typer.Option(help="MODEL_SERVER_PORT override")] = None,
    host: Annotated[str | None, typer.Option(help="address to listen on")] = None,
) -> None:
    """Serve published models over HTTP (POST /model, GET /best-models, ...)."""
    from serving.model_server import run_model_server

    _configure_logging()
    run_model_server(
        load_settings(model_path=model_path, model_server_port=port, model_server_host=host)
    )


@app.command("train-api")
def train_api(
    port: Annotated[int | None, typer.Option(help="TRAIN_API_PORT override")] = None,
    host: Annotated[str | None, typer.Option(help="address to listen on")] = None,
    model_path: Annotated[Path | None, typer.Option(help="MODEL_PATH override")] = None,
) -> None:
    """Serve the offline trainer API (POST /train)."""
    import uvicorn

    from serving.train_api import create_train_app

    _configure_logging()
    settings = load_settings(train_api_port=port, train_api_host=host, model_path=model_path)
    uvicorn.run(
        create_train_app(settings), host=settings.train_api_host, port=settings.train_api_port
    )


@app.command()
def estimator(
    socket: Annotated[Path | None, typer.Option(help="ESTIMATOR_SOCKET override")] = None,
    model_path: Annotated[Path | None, typer.Option(help="MODEL_PATH override")] = None,
) -> None:
    """Answer Kepler's power requests on a Unix socket."""
    from estimator.server import run_estimator

    _configure_logging()
    run_estimator(load_settings(estimator_socket=socket, model_path=model_path))


@app.command()
def up(
    model_path: Annotated[Path | None, typer.Option(help="MODEL_PATH override")] = None,
    db: Annotated[Path | None, typer.Option(help="DUCKDB_PATH override")] = None,
    retrain: Annotated[bool, typer.Option(help="train even when models exist")] = False,
) -> None:
    """The main job: train on the bundled real dump unless models exist, then serve all."""
    from kepler_model.up import run_up

    _configure_logging()
    run_up(load_settings(model_path=model_path, duckdb_path=db), retrain=retrain)


@app.command()
def config() -> None:
    """Print the effective settings as JSON."""
    typer.echo(json.dumps(load_settings().model_dump(mode="json"), indent=2))


def main() -> None:
    app()
