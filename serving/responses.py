"""What the model server answers, as typed bodies; ``/openapi.json`` is generated from these.

The weight JSON of ``POST /model`` is not modelled here: it is the published file as Kepler reads
it, passed on unchanged apart from the few top-level keys the server adds.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, RootModel


class FieldProblem(BaseModel):
    field: str = Field(description="dotted path of the offending field, '(body)' for the body")
    message: str
    type: str = Field(description="pydantic's error type, e.g. missing, bool_type")


class ErrorReply(BaseModel):
    """Any refused request."""

    error: str = Field(description="what is wrong, in words")
    details: list[FieldProblem] | None = Field(
        default=None, description="one entry per invalid field (422 replies)"
    )


class NotFoundReply(BaseModel):
    """A model or pipeline asked for by name that is not published."""

    error: str
    available: list[str] = Field(description="what is published instead")


class NoModelReply(BaseModel):
    """``POST /model`` when nothing published fits the request."""

    error: str
    searched: dict[str, Any] = Field(description="the request as the selection understood it")
    available: list[str] = Field(
        description="pipeline/source/output type/feature group/model of every model of the "
        "requested source and output type"
    )
    pipelines: list[str] = Field(description="every pipeline loaded")


class PipelineReply(BaseModel):
    name: str
    version: int | None = Field(description="the version served; null when unversioned")
    versions: list[int] = Field(description="every complete version kept on disk")
    metadata: dict[str, Any] = Field(description="the pipeline's metadata.json")
    node_types: dict[str, Any] = Field(description="the pipeline's node_type_index.json")
    model_count: int
    models: dict[str, dict[str, int]] = Field(description="{source: {output type: count}}")


class PipelinesReply(BaseModel):
    pipelines: list[PipelineReply]


class ModelReply(BaseModel):
    """One published model, for ``GET /models/{pipeline}/{source}/{output_type}/...``."""

    pipeline: str
    pipeline_version: int | None
    source: str
    output_type: str
    feature_group: str
    model_name: str
    trainer: str
    node_type: int
    features: list[str]
    weight_capable: bool = Field(description="a weight JSON is published beside the archive")
    archive_bytes: int | None = Field(description="size of the archive; null if it vanished")
    metadata: dict[str, Any] = Field(description="the archive's metadata.json")


class HealthReply(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyReply(BaseModel):
    status: Literal["ready", "not ready"]
    pipelines: int
    models: int
    reason: str | None = None


class BestModelsReply(RootModel[dict[str, dict[str, str]]]):
    """{output type: {feature group: model name}}; every asked output type present."""


RESPONSE_MODELS: tuple[type[BaseModel], ...] = (
    ErrorReply,
    NotFoundReply,
    NoModelReply,
    PipelinesReply,
    ModelReply,
    HealthReply,
    ReadyReply,
    BestModelsReply,
)
