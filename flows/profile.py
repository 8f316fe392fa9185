"""profile: a dump of an idle run in, ``profile/<source>.json`` per energy source out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.tasks import run_logger
from modelling.profile import IdleProfile, build_profiles, write_profiles
from storage.dumps import read_dump


@task(cache_policy=NO_CACHE)
def read_idle_run(path: Path) -> pl.DataFrame:
    samples = read_dump(path)
    run_logger().info("read %d samples of the idle run %s", samples.height, path)
    return samples


@task(cache_policy=NO_CACHE)
def profile_idle_run(
    samples: pl.DataFrame, node_type: int, instance_node_types: dict[str, int] | None = None
) -> dict[str, IdleProfile]:
    """Per energy source; instances are of ``node_type`` unless ``instance_node_types`` says."""
    return build_profiles(samples, node_type, instance_node_types)


@task(cache_policy=NO_CACHE)
def write_idle_profiles(profiles: dict[str, IdleProfile], output: Path) -> list[Path]:
    written = write_profiles(profiles, output)
    for path in written:
        run_logger().info("wrote idle profile %s", path)
    return written


@flow(name="profile")
def profile(input: str, output: str, node_type: int = 0) -> dict[str, Any]:
    """Profile the idle run in ``input`` as node type ``node_type``; write under ``output``."""
    samples = read_idle_run(Path(input))
    profiles = profile_idle_run(samples, node_type)
    written = write_idle_profiles(profiles, Path(output))
    return {
        "files": [str(path) for path in written],
        "profiles": {source: p.to_json() for source, p in profiles.items()},
    }
