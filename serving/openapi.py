"""The model server's OpenAPI 3.1 description, served at ``/openapi.json``.

Paths are written by hand; request and response bodies are the pydantic models' own schemas, so
the description cannot drift from what the server validates and answers.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from modelling.vocabulary import OutputType
from serving.requests import ModelRequest
from serving.responses import RESPONSE_MODELS

REF = "#/components/schemas/{model}"

SELECTION_HEADERS = {
    "X-Model-Name": "the chosen model, <Trainer>_<node type>",
    "X-Pipeline": "its pipeline",
    "X-Source": "its energy source",
    "X-Output-Type": "AbsPower or DynPower",
    "X-Feature-Group": "its feature group",
    "X-Trainer": "its trainer",
    "X-Node-Type": "its node type",
    "X-Node-Type-Matched": "true when the node type is the one asked for",
    "X-Node-Type-Similarity": "with machine_spec: how similar the node type is (0 to 1)",
    "X-Node-Type-Uncertainty": "with machine_spec: how uncertain that match is (0 to 1)",
    "X-Node-Type-Runner-Up": "with machine_spec: the next most similar node type",
    "X-Ignored-Fields": "request fields the server does not know and ignored (when any)",
}


def openapi_schema() -> dict[str, Any]:
    """The whole document: info, paths and every request and response model."""
    replies: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        (model, "serialization") for model in RESPONSE_MODELS
    ]
    _, definitions = models_json_schema([(ModelRequest, "validation"), *replies], ref_template=REF)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Kepler model server", "version": "1"},
        "paths": {**_model_paths(), **_catalogue_paths(), **_service_paths()},
        "components": {"schemas": definitions.get("$defs", {})},
    }


def _ref(model: str) -> dict[str, str]:
    return {"$ref": REF.format(model=model)}


def _reply(description: str, model: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    reply: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": _ref(model)}},
    }
    if headers:
        reply["headers"] = headers
    return reply


def _error(description: str) -> dict[str, Any]:
    return _reply(description, "ErrorReply")


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def _path_parameter(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
        "description": description,
    }


def _weight_json() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "component -> {All_Weights: ...} as published, plus model_name, "
        "machine_spec and the error key (ERROR_KEY)",
        "properties": {
            "model_name": {"type": "string"},
            "machine_spec": {"type": "object"},
        },
        "required": ["model_name"],
        "additionalProperties": True,
    }


def _model_paths() -> dict[str, Any]:
    headers = {
        name: {"description": text, "schema": {"type": "string"}}
        for name, text in SELECTION_HEADERS.items()
    }
    chosen = {
        "description": "the weight JSON (weight: true), else the archive as an attachment",
        "headers": headers,
        "content": {
            "application/json": {"schema": _weight_json()},
            "application/zip": {"schema": {"type": "string", "format": "binary"}},
        },
    }
    post = {
        "summary": "The best published model for a client's metrics (SPEC section 6)",
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _ref("ModelRequest")}},
        },
        "responses": {
            "200": chosen,
            "400": _error("invalid JSON, unknown energy source or malformed filter"),
            "404": _reply("no published model matches; says what was searched", "NoModelReply"),
            "413": _error("request body too large"),
            "422": _error("a field has the wrong type or value"),
            "503": _error("the chosen archive vanished (a version was pruned); retry"),
        },
    }
    return {"/model": {"post": post}}


def _catalogue_paths() -> dict[str, Any]:
    output_types = [o.value for o in OutputType]
    best = {
        "summary": "Best model name per output type and feature group",
        "parameters": [
            _query("energy-source", {"type": "string"}, "energy source (default rapl-sysfs)"),
            _query("output-type", {"type": "string", "enum": output_types}, "one output type"),
            _query("feature-group", {"type": "string"}, "one feature group"),
            _query("node-type", {"type": "integer", "minimum": -1}, "one node type"),
            _query("filter", {"type": "string"}, "key:value;key:value, e.g. mae:10"),
        ],
        "responses": {
            "200": _reply("{output type: {feature group: model name}}", "BestModelsReply"),
            "400": _error("unknown energy source or malformed filter"),
            "422": _error("a query parameter has the wrong type"),
        },
    }
    where = ("pipeline", "source", "output_type", "group", "name")
    model = {
        "summary": "One published model's metadata",
        "parameters": [_path_parameter(p, f"the model's {p}") for p in where],
        "responses": {
            "200": _reply("the model's metadata and where it is published", "ModelReply"),
            "404": _reply("no such model; names those published", "NotFoundReply"),
        },
    }
    pipelines = {
        "summary": "Every loaded pipeline: metadata, versions, node types and model counts",
        "responses": {"200": _reply("the loaded pipelines", "PipelinesReply")},
    }
    return {
        "/best-models": {"get": best},
        "/models/{pipeline}/{source}/{output_type}/{group}/{name}": {"get": model},
        "/pipelines": {"get": pipelines},
    }


def _service_paths() -> dict[str, Any]:
    metrics = {
        "description": "Prometheus text format: requests, latency, models loaded, weights",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
    return {
        "/healthz": {"get": {"responses": {"200": _reply("the process answers", "HealthReply")}}},
        "/readyz": {
            "get": {
                "responses": {
                    "200": _reply("at least one pipeline is loaded", "ReadyReply"),
                    "503": _reply("no pipeline loaded", "ReadyReply"),
                }
            }
        },
        "/metrics": {"get": {"responses": {"200": metrics}}},
        "/openapi.json": {
            "get": {
                "responses": {
                    "200": {
                        "description": "this document",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                }
            }
        },
    }
