"""The body of ``POST /train`` (SPEC section 9), read without materialising its dumps.

The small fields are decoded and validated as usual. The workload dump (``prom_response``, or
the seed's ``prome_response``) and the idle dump (``trainer.idle_prom_response``) are only stepped
over, one series at a time, and their text is copied to the files the training flow reads; the
request never holds them as Python objects. Their contents are checked by the flow's reader.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from flows.train_and_publish import DEFAULT_TRAINERS
from modelling.isolate import UnknownIsolatorError, isolator_class_name
from modelling.trainers import TRAINERS
from modelling.vocabulary import normalise_source
from storage.json_cursor import JsonCursor
from storage.pipelines import check_pipeline_name

DUMP_FIELDS = ("prom_response", "prome_response")
IDLE_FIELD = "idle_prom_response"
COPY_CHARS = 1 << 20


class TrainRequestError(ValueError):
    """A train request the client got wrong; ``status`` is the HTTP reply code."""

    status = 400


class InvalidTrainRequestError(TrainRequestError):
    status = 422


class DumpSpan:
    """Where a dump's JSON object lies in the body text, and how many metrics it names."""

    __slots__ = ("start", "end", "metrics")

    def __init__(self, start: int, end: int, metrics: int) -> None:
        self.start = start
        self.end = end
        self.metrics = metrics


def _dump_span(value: Any) -> DumpSpan:
    if not isinstance(value, DumpSpan):
        raise ValueError("must be an object of metric name -> Prometheus result")
    if value.metrics == 0:
        raise ValueError("holds no metrics")
    return value


class TrainerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    abs_trainers: list[str] = Field(default_factory=lambda: list(DEFAULT_TRAINERS))
    dyn_trainers: list[str] = Field(default_factory=lambda: list(DEFAULT_TRAINERS))
    isolator: str = "MinIdleIsolator"
    isolator_args: dict[str, Any] = Field(default_factory=dict)
    idle_prom_response: DumpSpan | None = None

    @field_validator("abs_trainers", "dyn_trainers")
    @classmethod
    def known_trainers(cls, names: list[str]) -> list[str]:
        unknown = [n for n in names if n not in TRAINERS]
        if unknown:
            raise ValueError(f"unknown trainers {unknown}; available: {sorted(TRAINERS)}")
        return names

    @field_validator("isolator")
    @classmethod
    def known_isolator(cls, name: str) -> str:
        try:
            isolator_class_name(name)
        except UnknownIsolatorError as exc:
            raise ValueError(str(exc)) from None
        return name

    @field_validator("isolator_args")
    @classmethod
    def no_server_paths(cls, args: dict[str, Any]) -> dict[str, Any]:
        # The isolators also read a profile from a path; a client may not name server files.
        if "profile" in args and not isinstance(args["profile"], dict):
            raise ValueError("profile is the idle profile's JSON object, not a path")
        return args

    @model_validator(mode="after")
    def some_trainer(self) -> TrainerSpec:
        if not self.abs_trainers and not self.dyn_trainers:
            raise ValueError("abs_trainers and dyn_trainers are both empty: nothing to train")
        return self

    @field_validator("idle_prom_response", mode="before")
    @classmethod
    def idle_dump(cls, value: Any) -> DumpSpan | None:
        return None if value is None else _dump_span(value)


class TrainRequest(BaseModel):
    """SPEC section 9; the dumps are ``DumpSpan``s into the body text."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    name: str
    energy_source: str = "rapl-sysfs"
    trainer: TrainerSpec = Field(default_factory=TrainerSpec)
    prom_response: DumpSpan
    node_type: int = 0
    machine_spec: dict[str, Any] | None = None

    @field_validator("name")
    @classmethod
    def plain_name(cls, name: str) -> str:
        return check_pipeline_name(name)

    @field_validator("energy_source")
    @classmethod
    def known_source(cls, source: str) -> str:
        return normalise_source(source)

    @field_validator("prom_response", mode="before")
    @classmethod
    def workload_dump(cls, value: Any) -> DumpSpan:
        return _dump_span(value)


@dataclass(frozen=True)
class TrainJob:
    """A validated request whose dumps are written where the flow reads them."""

    request: TrainRequest
    workload: Path
    idle: Path | None


def prepare_training(body: Path, folder: Path) -> TrainJob:
    """Parse and validate the body file, and write its dumps into ``folder``."""
    try:
        text = body.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TrainRequestError(f"body is not valid JSON: not UTF-8: {exc}") from None
    request = parse_train_request(text)
    workload = copy_span(text, request.prom_response, folder / "workload.json")
    idle_dump = request.trainer.idle_prom_response
    idle = copy_span(text, idle_dump, folder / "idle.json") if idle_dump else None
    return TrainJob(request, workload, idle)


def parse_train_request(text: str) -> TrainRequest:
    try:
        document = read_document(JsonCursor(text))
    except ValueError as exc:  # JSONDecodeError, or an integer past int_max_str_digits
        raise TrainRequestError(f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise TrainRequestError("body is not valid JSON: nested too deeply") from None
    try:
        return TrainRequest.model_validate(document)
    except ValidationError as exc:
        details = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}"
            for e in exc.errors(include_url=False, include_input=False)
        )
        raise InvalidTrainRequestError(details) from None


def read_document(cursor: JsonCursor) -> Any:
    """The body with its dumps replaced by ``DumpSpan``s; any other JSON value as it is."""
    if cursor.peek() != "{":
        document = cursor.value()
    else:
        document = {}
        for key in cursor.members():
            if key in DUMP_FIELDS:
                document[key] = read_dump_span(cursor)
            elif key == "trainer":
                document[key] = read_trainer(cursor)
            else:
                document[key] = cursor.value()
        if "prome_response" in document:
            spelled = document.pop("prome_response")
            document.setdefault("prom_response", spelled)
    cursor.end()
    return document


def read_trainer(cursor: JsonCursor) -> Any:
    if cursor.peek() != "{":
        return cursor.value()
    trainer = {}
    for key in cursor.members():
        trainer[key] = read_dump_span(cursor) if key == IDLE_FIELD else cursor.value()
    return trainer


def read_dump_span(cursor: JsonCursor) -> Any:
    """Step over a dump one series at a time; a value that is not an object is returned."""
    if cursor.peek() != "{":
        return cursor.value()
    start = cursor.pos
    metrics = 0
    for _ in cursor.members():
        metrics += 1
        cursor.skip(depth=1)
    return DumpSpan(start, cursor.pos, metrics)


def copy_span(text: str, span: DumpSpan, target: Path) -> Path:
    """Write the dump's text to ``target`` a megabyte at a time."""
    with target.open("w", encoding="utf-8") as out:
        for start in range(span.start, span.end, COPY_CHARS):
            out.write(text[start : min(start + COPY_CHARS, span.end)])
    return target
