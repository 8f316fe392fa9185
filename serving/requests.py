"""What clients send the model server, validated at the boundary (SPEC section 6).

Everything a client can get wrong is raised here as a ``RequestError`` that carries its HTTP
status; the server turns those into replies in one place.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Mapping
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from modelling.machine_spec import MachineSpec as ParsedMachineSpec
from modelling.vocabulary import (
    DEFAULT_SOURCE,
    FEATURE_GROUPS,
    WEIGHT_TRAINERS,
    OutputType,
    normalise_source,
)
from storage.catalogue import ModelQuery

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_NAMED_FIELDS = 10
MAX_NODE_TYPE = 2**31 - 1  # node types are small indices; Go's int32 bound
_UNPRINTABLE = re.compile(r"[^\x21-\x7e]")


class RequestError(ValueError):
    """A request the client got wrong; ``status`` is the HTTP reply code."""

    status = 400

    def body(self) -> dict[str, Any]:
        return {"error": str(self)}


class InvalidJSONError(RequestError):
    """A body that is not JSON at all."""


class BodyTooLargeError(RequestError):
    status = 413


class RequestValidationError(RequestError):
    """JSON that does not fit the request model; ``details`` names each offending field."""

    status = 422

    def __init__(self, message: str, details: list[dict[str, str]]) -> None:
        super().__init__(message)
        self.details = details

    def body(self) -> dict[str, Any]:
        return {"error": str(self), "details": self.details}

    @classmethod
    def from_pydantic(
        cls, error: ValidationError, what: str, ignored: list[str] | None = None
    ) -> RequestValidationError:
        details = [
            {"field": _location(e["loc"]) or "(body)", "message": e["msg"], "type": e["type"]}
            for e in error.errors(include_url=False, include_input=False)
        ]
        summary = "; ".join(f"{d['field']}: {d['message']}" for d in details)
        if ignored:
            summary += f"; unknown fields ignored: {name_fields(ignored)}"
        return cls(f"invalid {what}: {summary}", details)


def _location(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc)


def name_fields(names: list[str] | tuple[str, ...]) -> str:
    """Field names for a message or a header: printable ASCII, at most ``MAX_NAMED_FIELDS``."""
    shown = [_UNPRINTABLE.sub("?", name[:64]) for name in names[:MAX_NAMED_FIELDS]]
    more = len(names) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def unknown_fields(document: Any, known: Mapping[str, Any]) -> list[str]:
    """Top-level keys of ``document`` that are not among ``known``, in the order sent."""
    return [key for key in document if key not in known] if isinstance(document, dict) else []


def _whole_number(value: Any) -> Any:
    """JSON does not tell 1 from 1.0: accept both, and still refuse "1" and true."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


NodeType = Annotated[StrictInt, BeforeValidator(_whole_number)]


class MachineSpec(BaseModel):
    """The client's machine, to pick the closest node type (SPEC section 8)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    processor: StrictStr | None = None
    cores: float | None = Field(default=None, ge=0)
    chips: float | None = Field(default=None, ge=0)
    memory: float | None = Field(default=None, ge=0)
    frequency: float | None = Field(default=None, ge=0)


class ModelRequest(BaseModel):
    """The body of ``POST /model``, as Kepler's Go client and operators send it.

    Types are strict: ``"yes"`` is not a boolean and ``"1"`` is not a node type. Unknown fields
    are ignored, not refused (Kepler sends ``model_name`` on some versions, and a newer Kepler
    must still get its model), but named: in the reply's ``X-Ignored-Fields`` header, and in the
    message when the request is refused for another reason (``metric`` for ``metrics``).
    """

    model_config = ConfigDict(extra="ignore")

    metrics: list[StrictStr] = Field(min_length=1, max_length=1024)
    output_type: OutputType
    source: StrictStr = DEFAULT_SOURCE
    node_type: NodeType = Field(default=-1, ge=-1, le=MAX_NODE_TYPE)
    weight: StrictBool = False
    trainer_name: StrictStr = ""
    filter: StrictStr = ""
    pipeline_name: StrictStr = ""
    machine_spec: MachineSpec | None = None
    loose_node_type: StrictBool = True

    _ignored: tuple[str, ...] = PrivateAttr(default=())

    @model_validator(mode="after")
    def weights_exist_for_the_trainer(self) -> ModelRequest:
        # Only the four weight-capable trainers publish weight JSON; asking another one for
        # weights can never be answered, whatever is published.
        if self.weight and self.trainer_name and self.trainer_name not in WEIGHT_TRAINERS:
            raise ValueError(
                f"{self.trainer_name} publishes no weight JSON; ask for its archive "
                f"(weight: false) or for one of {', '.join(sorted(WEIGHT_TRAINERS))}"
            )
        return self

    @classmethod
    def from_document(cls, document: Any) -> ModelRequest:
        """Validate a decoded body, remembering which of its fields were ignored."""
        ignored = unknown_fields(document, cls.model_fields)
        try:
            request = cls.model_validate(document)
        except ValidationError as exc:
            raise RequestValidationError.from_pydantic(exc, "model request", ignored) from None
        request._ignored = tuple(ignored)
        return request

    @property
    def ignored_fields(self) -> tuple[str, ...]:
        return self._ignored

    def to_query(self) -> ModelQuery:
        """The catalogue's query; an unknown source raises ``UnknownSourceError``."""
        return ModelQuery(
            metrics=tuple(self.metrics),
            output_type=self.output_type.value,
            source=normalise_source(self.source),
            node_type=self.node_type,
            weight=self.weight,
            trainer_name=self.trainer_name,
            filter=self.filter,
            pipeline_name=self.pipeline_name,
            loose_node_type=self.loose_node_type,
            machine_spec=(
                ParsedMachineSpec.from_mapping(self.machine_spec.model_dump())
                if self.machine_spec
                else None
            ),
        )


class BestModelsQuery(BaseModel):
    """The query string of ``GET /best-models``; names as Kepler's operators spell them."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    energy_source: str = Field(default=DEFAULT_SOURCE, alias="energy-source")
    output_type: OutputType | None = Field(default=None, alias="output-type")
    feature_group: str | None = Field(default=None, alias="feature-group")
    node_type: int | None = Field(default=None, alias="node-type", ge=-1, le=MAX_NODE_TYPE)
    filter: str = ""

    @field_validator("feature_group")
    @classmethod
    def known_group(cls, group: str | None) -> str | None:
        known = (*FEATURE_GROUPS, "ThirdParty")
        if group is not None and group not in known:
            raise ValueError(f"unknown feature group {group!r}; known: {', '.join(known)}")
        return group

    @property
    def source(self) -> str:
        return normalise_source(self.energy_source)


async def read_body(chunks: AsyncIterator[bytes], declared: str | None, limit: int) -> bytes:
    """The whole body, refusing it as soon as it is known to exceed ``limit`` bytes."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLargeError(f"request body of {declared} bytes exceeds the {limit} byte limit")
    received = bytearray()
    async for chunk in chunks:
        received += chunk
        if len(received) > limit:
            raise BodyTooLargeError(f"request body exceeds the {limit} byte limit")
    return bytes(received)


def parse_model_request(body: bytes) -> ModelRequest:
    """Decode and validate a ``POST /model`` body."""
    try:
        document = json.loads(body)
    except ValueError as exc:  # bad JSON or UTF-8, or an integer past int_max_str_digits
        raise InvalidJSONError(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidJSONError("request body is not valid JSON: nested too deeply") from None
    return ModelRequest.from_document(document)


def parse_best_models_query(params: Mapping[str, str]) -> BestModelsQuery:
    try:
        return BestModelsQuery.model_validate(dict(params))
    except ValidationError as exc:
        raise RequestValidationError.from_pydantic(exc, "best-models query") from None
