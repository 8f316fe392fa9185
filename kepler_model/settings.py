"""One settings object, built once at start-up and passed to whoever needs it.

Precedence, lowest first: defaults, ``MODEL_CONFIG`` lines, files ``CONFIG_PATH/<KEY>`` (Kepler
mounts its config map that way), the environment, then explicit values (CLI flags).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

DEFAULT_CONFIG_PATH = "/etc/kepler/kepler.config"


def _config_path() -> Path:
    return Path(os.environ.get("CONFIG_PATH", DEFAULT_CONFIG_PATH))


class ConfigFilesSource(PydanticBaseSettingsSource):
    """Values from ``CONFIG_PATH/<KEY>`` files; surrounding white space is dropped."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        path = _config_path() / field_name.upper()
        if path.is_file():
            return path.read_text().strip(), field_name, False
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, field in self.settings_cls.model_fields.items():
            value, key, _ = self.get_field_value(field, name)
            if value is not None:
                values[key] = value
        return values


def parse_model_config(text: str) -> dict[str, str]:
    """``KEY=VALUE`` lines, ``#`` starting a comment, as Kepler's MODEL_CONFIG holds them."""
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if "=" not in line:
            continue
        key, value = line.split("=", 1)
        values[key.strip().lower()] = value.strip()
    return values


class ModelConfigSource(PydanticBaseSettingsSource):
    """The ``MODEL_CONFIG`` block, from the environment or its config file."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        text = os.environ.get("MODEL_CONFIG")
        path = _config_path() / "MODEL_CONFIG"
        if text is None and path.is_file():
            text = path.read_text()
        if not text:
            return {}
        fields = self.settings_cls.model_fields
        return {k: v for k, v in parse_model_config(text).items() if k in fields}


class Settings(BaseSettings):
    """Every key is also read as an upper-case environment variable or config file."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore")

    model_path: Path = Path("./models")
    duckdb_path: Path = Path("./data/kepler.duckdb")
    default_pipeline: str = "kepler-default"

    model_server_host: str = "0.0.0.0"
    model_server_port: int = 8100
    model_server_enable: bool = False
    model_server_url: str = "http://localhost:8100"
    initial_pipeline_url: str = ""
    error_key: str = "mae"

    model_server_max_body_bytes: int = 4 * 1024 * 1024

    train_api_host: str = "0.0.0.0"
    train_api_port: int = 8102
    train_max_body_bytes: int = 512 * 1024 * 1024

    estimator_socket: Path = Path("/tmp/estimator.sock")
    estimator_max_request_bytes: int = 16 * 1024 * 1024
    estimator_read_timeout: float = 10.0
    estimator_match_machine: bool = True
    node_components_init_url: str = ""
    node_total_init_url: str = ""

    prom_server: str = "http://localhost:9090"
    prom_query_interval: int = 300
    prom_query_step: int = 3
    prom_ssl_disable: bool = False
    prom_thirdparty_metrics: str = ""
    prom_bearer_token: SecretStr = SecretStr("")
    prom_username: str = ""
    prom_password: SecretStr = SecretStr("")
    prom_query_timeout: float = 60.0
    sampling_interval: int = 300
    data_retention: str = "7d"
    training_window: str = "1d"

    task_runner: str = Field(default="thread", pattern="^(thread|dask)$")
    dask_address: str = ""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            ConfigFilesSource(settings_cls),
            ModelConfigSource(settings_cls),
        )

    @property
    def thirdparty_metrics(self) -> tuple[str, ...]:
        return tuple(m for m in self.prom_thirdparty_metrics.split(",") if m)


def load_settings(**overrides: Any) -> Settings:
    """Build the settings; ``overrides`` with value None are left to the other sources."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
