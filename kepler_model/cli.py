"""``kepler-model``: train, serve and run everything from one command line.

Flags override settings, which come from CONFIG_PATH files and the environment.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer

from kepler_model.settings import Settings, load_settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


def _split(names: str | None) -> list[str] | None:
    return [n.strip() for n in names.split(",") if n.strip()] if names else None


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _exit_on_sigterm() -> None:
    """For the commands that run a flow in this process: SIGTERM exits, rather than kills, so
    that the atexit hook stopping Prefect's temporary API server runs. The servers handle
    their signals themselves (uvicorn re-raises them after shutting down; see
    flows/api_server.py)."""
    signal.signal(signal.SIGTERM, _raise_exit)


def _configure_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # One line per HTTP call to the Prefect API drowns the lines an operator wants.
    logging.getLogger("httpx").setLevel(logging.DEBUG if verbose else logging.WARNING)


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
    isolator_args: dict[str, Any] | None = None,
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
        isolator_args=isolator_args,
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
    from modelling.training import HOLDOUT_FRACTION

    typer.echo(
        f"MAE and MAPE: the worst component's, on the latest {HOLDOUT_FRACTION:.0%} of the data"
    )
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


def run_store_training(
    settings: Settings,
    pipeline: str,
    energy_source: str = "rapl-sysfs",
    abs_trainers: list[str] | None = None,
    dyn_trainers: list[str] | None = None,
    isolator: str = "MinIdleIsolator",
    node_type: int = 0,
) -> dict[str, Any]:
    """Run the store-training flow on everything the sample store holds; returns its report."""
    from flows.online_training import train_from_store
    from flows.runners import make_task_runner

    runner = make_task_runner(settings.task_runner, settings.dask_address)
    report: dict[str, Any] = train_from_store.with_options(task_runner=runner)(
        pipeline=pipeline,
        energy_source=energy_source,
        abs_trainers=abs_trainers,
        dyn_trainers=dyn_trainers,
        isolator=isolator,
        db_path=str(settings.duckdb_path),
        model_path=str(settings.model_path),
        node_type=node_type,
        thirdparty_metrics=list(settings.thirdparty_metrics),
        error_key=settings.error_key,
    )
    return report


def parse_time(text: str | None) -> float | None:
    """Unix seconds, or an ISO 8601 time (UTC unless it names its zone)."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as error:
        raise typer.BadParameter(f"{text!r} is neither Unix seconds nor ISO 8601") from error
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


@app.command()
def ingest(
    prometheus: Annotated[str | None, typer.Option(help="PROM_SERVER override")] = None,
    start: Annotated[
        str | None, typer.Option(help="Unix seconds or ISO 8601; default: where the last ended")
    ] = None,
    end: Annotated[str | None, typer.Option(help="Unix seconds or ISO 8601; default: now")] = None,
    db: Annotated[Path | None, typer.Option(help="DUCKDB_PATH override")] = None,
    step: Annotated[int | None, typer.Option(help="PROM_QUERY_STEP override (s)")] = None,
) -> None:
    """Fetch Kepler's metrics from Prometheus into the sample store."""
    from flows.ingest import ingest as ingest_flow
    from storage.prometheus import PrometheusQueryError, PrometheusSource, check_reachable

    _configure_logging()
    _exit_on_sigterm()
    first, last = parse_time(start), parse_time(end)
    try:
        # A server that is not there at all is said at once; the flow's retries are for
        # failures in the middle of a run.
        check_reachable(PrometheusSource.from_settings(load_settings(prom_server=prometheus)))
        report = ingest_flow(
            prometheus=prometheus,
            db_path=str(db) if db else None,
            start=first,
            end=last,
            step=step,
        )
    except PrometheusQueryError as error:
        typer.echo(f"ingest failed: {error}", err=True)
        raise typer.Exit(1) from error
    typer.echo(
        f"{report['samples_added']} new of {report['samples_seen']} samples from "
        f"{report['server']} ({report['metrics']} metrics, {report['queries']} queries, "
        f"window {report['start']} - {report['end']})"
    )


def _check_training_input(input: Path | None, db: Path | None, idle: Path | None) -> None:
    if input is not None:
        if not input.is_file():
            raise typer.BadParameter(f"{input} is not a file", param_hint="--input")
        return
    if db is None:
        raise typer.BadParameter("give a dump (--input) or a sample store (--db)")
    if not db.is_file():
        raise typer.BadParameter(f"{db} is not a sample store", param_hint="--db")
    if idle is not None:
        raise typer.BadParameter("an idle dump goes with --input", param_hint="--idle")


def _check_training_choices(
    pipeline: str,
    energy_source: str,
    trainers: dict[str, list[str] | None],
    isolator: str,
    idle: Path | None,
    input: Path | None,
    profile: Path | None = None,
) -> None:
    """Refuse names the flow would refuse, before Prefect and the data are loaded."""
    from modelling.isolate import UnknownIsolatorError, isolator_class_name, needs_idle_profile
    from modelling.trainers import TRAINERS
    from modelling.vocabulary import UnknownSourceError, normalise_source
    from storage.pipelines import PipelineNameError, check_pipeline_name

    try:
        check_pipeline_name(pipeline)
    except PipelineNameError as error:
        raise typer.BadParameter(str(error), param_hint="--pipeline") from None
    try:
        normalise_source(energy_source)
    except UnknownSourceError as error:
        raise typer.BadParameter(str(error), param_hint="--energy-source") from None
    for option, names in trainers.items():
        unknown = [name for name in names or () if name not in TRAINERS]
        if unknown:
            known = ", ".join(TRAINERS)
            raise typer.BadParameter(f"unknown {unknown}; known: {known}", param_hint=option)
    try:
        isolator_class_name(isolator)
    except UnknownIsolatorError as error:
        raise typer.BadParameter(str(error), param_hint="--isolator") from None
    if input is not None and idle is None and profile is None and needs_idle_profile(isolator):
        raise typer.BadParameter(f"{isolator} needs an idle run", param_hint="--idle or --profile")
    if input is None and profile is not None:
        raise typer.BadParameter("an idle profile goes with --input", param_hint="--profile")
    for option, path in (("--idle", idle), ("--profile", profile)):
        if path is not None and not path.exists():
            raise typer.BadParameter(f"{path} does not exist", param_hint=option)


@app.command()
def train(
    input: Annotated[
        Path | None,
        typer.Option("--input", help="Prometheus dump (.json or .json.gz); omit to train on --db"),
    ] = None,
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
    profile: Annotated[
        Path | None,
        typer.Option(help="idle profile from `kepler-model profile` (its folder), for --idle"),
    ] = None,
    node_type: Annotated[int, typer.Option(help="node type of the data's machine")] = 0,
    machine_spec: Annotated[
        Path | None,
        typer.Option("--machine-spec", help="JSON file of the data's machine spec (see `spec`)"),
    ] = None,
    model_path: Annotated[Path | None, typer.Option(help="MODEL_PATH override")] = None,
    db: Annotated[Path | None, typer.Option(help="DUCKDB_PATH override")] = None,
) -> None:
    """Train on a dump (--input), or on all the sample store holds (--db alone), and publish."""
    _configure_logging()
    _exit_on_sigterm()
    _check_training_input(input, db, idle)
    abs_names, dyn_names = _split(abs_trainers), _split(dyn_trainers)
    choices = {"--abs-trainers": abs_names, "--dyn-trainers": dyn_names}
    _check_training_choices(pipeline, energy_source, choices, isolator, idle, input, profile)
    spec = read_machine_spec_option(machine_spec, input)
    settings = load_settings(model_path=model_path, duckdb_path=db)
    started = time.perf_counter()
    try:
        if input is None:
            report = run_store_training(
                settings, pipeline, energy_source, abs_names, dyn_names, isolator, node_type
            )
        else:
            report = run_training(
                settings,
                input,
                pipeline,
                energy_source,
                abs_names,
                dyn_names,
                isolator,
                idle,
                node_type,
                machine_spec=spec,
                isolator_args={"profile": str(profile)} if profile else None,
            )
    except (ValueError, OSError) as error:
        # Malformed dumps, idle runs and stores; the flow run's log holds the details.
        typer.echo(f"training failed: {error}", err=True)
        raise typer.Exit(1) from None
    print_report(report)
    typer.echo(f"trained in {time.perf_counter() - started:.1f} s")
    if not report["path"]:
        typer.echo("no model could be trained from this data; nothing was published", err=True)
        raise typer.Exit(1)


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
    from estimator.server import SocketInUseError, run_estimator

    _configure_logging()
    try:
        run_estimator(load_settings(estimator_socket=socket, model_path=model_path))
    except (SocketInUseError, FileExistsError) as error:
        typer.echo(f"cannot start: {error}", err=True)
        raise typer.Exit(1) from None


@app.command()
def flows(
    sampling_interval: Annotated[
        int | None, typer.Option(help="SAMPLING_INTERVAL override: seconds between runs")
    ] = None,
    model_path: Annotated[Path | None, typer.Option(help="MODEL_PATH override")] = None,
    db: Annotated[Path | None, typer.Option(help="DUCKDB_PATH override")] = None,
) -> None:
    """Serve the Prefect deployments: online-training every SAMPLING_INTERVAL, ingest and
    offline-training on demand (`prefect deployment run ...`); no work pool needed."""
    from flows.serve import serve_deployments

    _configure_logging()
    settings = load_settings(
        sampling_interval=sampling_interval, model_path=model_path, duckdb_path=db
    )
    serve_deployments(settings)


@app.command()
def up(
    model_path: Annotated[Path | None, typer.Option(help="MODEL_PATH override")] = None,
    db: Annotated[Path | None, typer.Option(help="DUCKDB_PATH override")] = None,
    retrain: Annotated[bool, typer.Option(help="train even when models exist")] = False,
) -> None:
    """The main job: train on the bundled real dump unless models exist, then serve all."""
    from kepler_model.up import AddressInUseError, run_up

    _configure_logging()
    try:
        run_up(load_settings(model_path=model_path, duckdb_path=db), retrain=retrain)
    except AddressInUseError as error:
        typer.echo(f"cannot start: {error}", err=True)
        raise typer.Exit(1) from None


def read_machine_spec_option(path: Path | None, input: Path | None) -> dict[str, Any] | None:
    """The --machine-spec file as normalised attributes; it goes with a dump (--input)."""
    from modelling.machine_spec import MachineSpec, MachineSpecError

    if path is None:
        return None
    if input is None:
        raise typer.BadParameter("a machine spec goes with --input", param_hint="--machine-spec")
    try:
        body = json.loads(path.read_text())
        if not isinstance(body, dict):
            raise MachineSpecError("a machine spec is a JSON object")
        return MachineSpec.from_mapping(body).to_dict()
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(f"{path}: {exc}", param_hint="--machine-spec") from None


@app.command()
def spec() -> None:
    """Print this machine's spec (processor, cores, chips, memory GiB, frequency MHz) as JSON."""
    from modelling.machine_spec import discover_machine_spec

    typer.echo(json.dumps(discover_machine_spec().to_dict(), indent=2))


@app.command()
def profile(
    input: Annotated[Path, typer.Option("--input", help="Prometheus dump of an idle run")],
    output: Annotated[Path, typer.Option(help="folder that gets profile/<source>.json")],
    node_type: Annotated[int, typer.Option(help="node type of the idle machines")] = 0,
) -> None:
    """Profile the idle power of each energy source from an idle run."""
    from flows.profile import profile as profile_flow

    _configure_logging()
    _exit_on_sigterm()
    if not input.is_file():
        raise typer.BadParameter(f"{input} is not a file", param_hint="--input")
    result = profile_flow(input=str(input), output=str(output), node_type=node_type)
    print_profiles(result)


def print_profiles(result: dict[str, Any]) -> None:
    for source, body in result["profiles"].items():
        for nt, components in body["node_types"].items():
            for component, power in components.items():
                typer.echo(
                    f"{source} node type {nt} {component}: {power['mean_watts']:.2f} W "
                    f"(min {power['min_watts']:.2f}, max {power['max_watts']:.2f}, "
                    f"{power['units']} units)"
                )
    for path in result["files"]:
        typer.echo(f"wrote {path}")


pipelines_app = typer.Typer(
    no_args_is_help=True, help="List, roll back and prune published pipeline versions."
)
app.add_typer(pipelines_app, name="pipelines")


@pipelines_app.command("list")
def pipelines_list(
    model_path: Annotated[Path | None, typer.Option(help="MODEL_PATH override")] = None,
) -> None:
    """Each pipeline: the version served, its model count, last update and versions kept."""
    from storage.pipelines import published_pipelines

    root = load_settings(model_path=model_path).model_path
    found = published_pipelines(root)
    if not found:
        typer.echo(f"no pipeline under {root}")
    for p in found:
        served = "-" if p.current is None else f"v{p.current}"
        kept = ", ".join(f"v{v}" for v in p.versions) or "-"
        typer.echo(
            f"{p.name:32} served {served:>5}  {p.model_count:4} models  "
            f"updated {p.last_update_time or '-':19}  versions {kept}"
        )


@pipelines_app.command("rollback")
def pipelines_rollback(
    name: Annotated[str, typer.Argument(help="pipeline to roll back")],
    to: Annotated[int | None, typer.Option(help="version to serve; default: the previous")] = None,
    model_path: Annotated[Path | None, typer.Option(help="MODEL_PATH override")] = None,
) -> None:
    """Serve an earlier version again; running servers follow without a restart."""
    from storage.pipelines import PipelineNameError, PipelineNotFoundError, rollback

    try:
        version = rollback(load_settings(model_path=model_path).model_path, name, to)
    except (PipelineNotFoundError, PipelineNameError) as exc:
        raise typer.BadParameter(str(exc), param_hint="NAME") from None
    typer.echo(f"pipeline {name} now serves version {version}")


@pipelines_app.command("prune")
def pipelines_prune(
    keep: Annotated[int, typer.Option(min=1, help="newest versions to keep")],
    name: Annotated[str | None, typer.Argument(help="pipeline; default: all")] = None,
    model_path: Annotated[Path | None, typer.Option(help="MODEL_PATH override")] = None,
) -> None:
    """Delete old versions, keeping the newest KEEP and always the one served."""
    from storage.pipelines import PipelineNameError, PipelineNotFoundError, prune, versioned_names

    root = load_settings(model_path=model_path).model_path
    for pipeline in [name] if name else versioned_names(root):
        try:
            removed = prune(root, pipeline, keep)
        except (PipelineNotFoundError, PipelineNameError) as exc:
            raise typer.BadParameter(str(exc), param_hint="NAME") from None
        typer.echo(f"{pipeline}: removed {', '.join(f'v{v}' for v in removed) or 'nothing'}")


@app.command()
def config() -> None:
    """Print the effective settings as JSON."""
    typer.echo(json.dumps(load_settings().model_dump(mode="json"), indent=2))


def main() -> None:
    # Prefect's temporary API server reports usage at start; offline, as clusters that run
    # Kepler often are, that fails with an error line on every start. PREFECT_* still rules.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    app()
