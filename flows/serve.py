"""The three deployments served from one long-lived process, without a work pool.

``prefect deploy --all`` with a worker (prefect.yaml) is one way to run them; ``serve`` is the
other: this process registers the deployments, keeps online-training on its schedule of
SAMPLING_INTERVAL seconds, and runs whatever ``prefect deployment run`` asks of them.
"""

from __future__ import annotations

from typing import cast

from prefect import serve
from prefect.deployments.runner import RunnerDeployment

from flows.ingest import ingest
from flows.offline_training import offline_training
from flows.online_training import online_training
from kepler_model.settings import Settings
from kepler_model.up import bundled_dump


def build_deployments(settings: Settings) -> list[RunnerDeployment]:
    """online-training every ``sampling_interval`` s, never two at once; the others on demand."""
    # Absolute, so that runs find the stores whatever directory they start in.
    stores = {
        "db_path": str(settings.duckdb_path.resolve()),
        "model_path": str(settings.model_path.resolve()),
    }
    # to_deployment also has an async form; called from sync code it returns the deployment.
    deployments = [
        online_training.to_deployment(
            name="online-training",
            interval=settings.sampling_interval,
            concurrency_limit=1,
            parameters=stores,
        ),
        ingest.to_deployment(name="ingest", parameters={"db_path": stores["db_path"]}),
        offline_training.to_deployment(
            name="offline-training",
            parameters={"input": str(bundled_dump()), **stores},
        ),
    ]
    return [cast(RunnerDeployment, deployment) for deployment in deployments]


def serve_deployments(settings: Settings) -> None:
    """Serve the deployments until interrupted (blocks)."""
    serve(*build_deployments(settings))
