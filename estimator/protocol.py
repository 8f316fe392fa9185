"""The estimator's wire format (SPEC section 7): where a request ends, what it holds, the reply.

Kepler writes one JSON object per connection with no delimiter and no half-close, then reads
the reply with a single read of at most 4096 bytes; so the end of a request is found by
following the JSON structure, and replies are encoded as tightly as valid JSON allows.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from modelling.vocabulary import OutputType, normalise_source
from storage.catalogue import ModelQuery

KEPLER_READ_BYTES = 4096
WATT_DECIMALS = 3
MAX_NESTING = 32
MAX_MESSAGE_CHARS = 1000
MAX_REPORTED_PROBLEMS = 3

_OUTSIDE_STRING = re.compile(rb'[{}\[\]"]')
_INSIDE_STRING = re.compile(rb'["\\]')
_NOT_SPACE = re.compile(rb"[^ \t\r\n]")
_QUOTE, _BACKSLASH, _OPEN_BRACE = ord('"'), ord("\\"), ord("{")
_OPENERS = frozenset(b"{[")


class EstimatorError(Exception):
    """A request that gets no powers; the text becomes the reply's ``msg``.

    ``core_ratio`` is filled in once the model is known, so that error replies carry it too.
    """

    def __init__(self, message: str, core_ratio: float = 1.0) -> None:
        super().__init__(message)
        self.core_ratio = core_ratio


class RequestError(EstimatorError):
    """The client sent something that is not a valid estimation request."""


class RequestFramer:
    """Finds where the single JSON object of a request ends, whatever the chunking.

    It follows strings (with their escapes) and bracket depth over the raw bytes; UTF-8
    continuation bytes never look like JSON punctuation, so a chunk may end anywhere, even in
    the middle of a character. Validity is left to the JSON decoder once the object is closed.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._buffer = bytearray()
        self._position = 0
        self._depth = 0
        self._in_string = False
        self._started = False

    @property
    def received(self) -> int:
        return len(self._buffer)

    def feed(self, chunk: bytes) -> bytes | None:
        """The complete object once it has arrived, else None; ``b""`` means end of input."""
        if not chunk:
            raise RequestError(self._truncation_message())
        self._buffer += chunk
        end = self._scan()
        size = len(self._buffer) if end is None else end
        if size > self.max_bytes:
            raise RequestError(f"request exceeds {self.max_bytes} bytes")
        return None if end is None else bytes(self._buffer[:end])

    def _truncation_message(self) -> str:
        if not self._buffer.strip():
            return "empty request: the connection closed before any JSON arrived"
        return f"request ended after {len(self._buffer)} bytes, before its JSON object was complete"

    def _scan(self) -> int | None:
        if not self._started and not self._find_start():
            return None
        buffer = self._buffer
        while True:
            pattern = _INSIDE_STRING if self._in_string else _OUTSIDE_STRING
            match = pattern.search(buffer, self._position)
            if match is None:
                self._position = len(buffer)
                return None
            index = match.start()
            byte = buffer[index]
            if byte == _BACKSLASH:
                if index + 1 == len(buffer):
                    self._position = index  # the escaped byte has not arrived yet
                    return None
                self._position = index + 2
                continue
            self._position = index + 1
            if byte == _QUOTE:
                self._in_string = not self._in_string
            elif byte in _OPENERS:
                self._enter()
            else:
                self._depth -= 1
                if self._depth == 0:
                    return index + 1

    def _find_start(self) -> bool:
        match = _NOT_SPACE.search(self._buffer)
        if match is None:
            return False
        if self._buffer[match.start()] != _OPEN_BRACE:
            head = bytes(self._buffer[match.start() : match.start() + 20])
            raise RequestError(f"request must be a JSON object; it starts with {head!r}")
        self._started = True
        self._position = match.start()
        return True

    def _enter(self) -> None:
        self._depth += 1
        if self._depth > MAX_NESTING:
            raise RequestError(f"request nests deeper than {MAX_NESTING} levels")


Number = Annotated[float, Strict(), Field(allow_inf_nan=False)]
SystemValue = StrictStr | StrictInt | StrictFloat | None


class EstimationRequest(BaseModel):
    """Kepler's request: one row of ``values`` per process, container or node."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    metrics: list[StrictStr]
    values: list[list[Number]]
    output_type: OutputType
    source: StrictStr = Field(default="", validate_default=True)
    system_features: list[StrictStr] = []
    system_values: list[SystemValue] = []
    trainer_name: StrictStr = ""
    filter: StrictStr = ""

    @field_validator("source")
    @classmethod
    def _known_source(cls, source: str) -> str:
        return normalise_source(source)

    @model_validator(mode="after")
    def _consistent(self) -> EstimationRequest:
        if len(set(self.metrics)) != len(self.metrics):
            twice = sorted({m for m in self.metrics if self.metrics.count(m) > 1})
            raise ValueError(f"metrics lists {', '.join(twice)} more than once")
        for index, row in enumerate(self.values):
            if len(row) != len(self.metrics):
                raise ValueError(
                    f"values row {index} has {len(row)} column(s) but metrics names "
                    f"{len(self.metrics)}"
                )
        if len(self.system_values) != len(self.system_features):
            raise ValueError(
                f"system_values has {len(self.system_values)} entries but system_features "
                f"names {len(self.system_features)}"
            )
        return self

    def numeric_system_values(self) -> dict[str, float]:
        """System features whose value is a finite number (Kepler sends them as text)."""
        numeric = {}
        for name, value in zip(self.system_features, self.system_values, strict=True):
            number = _as_number(value)
            if number is not None and name not in self.metrics:
                numeric[name] = number
        return numeric

    def model_query(self) -> ModelQuery:
        """What to look up: every feature this request can supply, by name."""
        available = (*self.metrics, *self.numeric_system_values())
        return ModelQuery(
            metrics=tuple(available),
            output_type=self.output_type.value,
            source=self.source,
            trainer_name=self.trainer_name,
            filter=self.filter,
        )

    def rows_for(self, features: Sequence[str]) -> np.ndarray:
        """The rows with columns in ``features`` order; system features become constants."""
        columns = {name: index for index, name in enumerate(self.metrics)}
        constants = self.numeric_system_values()
        missing = [f for f in features if f not in columns and f not in constants]
        if missing:
            raise RequestError(f"the model needs features the request lacks: {', '.join(missing)}")
        values = np.asarray(self.values, dtype=float).reshape(len(self.values), len(self.metrics))
        rows = np.empty((values.shape[0], len(features)), dtype=float)
        for index, feature in enumerate(features):
            if feature in columns:
                rows[:, index] = values[:, columns[feature]]
            else:
                rows[:, index] = constants[feature]
        return rows


def _as_number(value: str | int | float | None) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def parse_request(body: bytes) -> EstimationRequest:
    """Decode and validate one request; every problem becomes a RequestError naming it."""
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise RequestError(f"request is not UTF-8: {exc}") from None
    except ValueError as exc:
        raise RequestError(f"request is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RequestError("request must be a JSON object")
    try:
        return EstimationRequest.model_validate(data)
    except ValidationError as exc:
        raise RequestError(f"invalid request: {describe_problems(exc)}") from None


def describe_problems(error: ValidationError) -> str:
    """The first few validation problems as ``where: what (got value)``."""
    problems = error.errors(include_url=False)
    described = [_describe(p) for p in problems[:MAX_REPORTED_PROBLEMS]]
    extra = len(problems) - len(described)
    if extra:
        described.append(f"and {extra} more")
    return "; ".join(described)


def _describe(problem: Any) -> str:
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in problem["loc"])
    message = str(problem["msg"]).removeprefix("Value error, ")
    if not where:
        return message
    text = f"{where.lstrip('.')}: {message}"
    if problem["type"] in ("missing", "model_attributes_type"):
        return text
    return f"{text} (got {_short_repr(problem.get('input'))})"


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class EstimationReply:
    """Always this shape, errors included: ``powers`` is a map, never a list."""

    powers: dict[str, list[float | int]]
    msg: str = ""
    core_ratio: float = 1.0

    @classmethod
    def from_powers(cls, powers: dict[str, np.ndarray], core_ratio: float) -> EstimationReply:
        return cls({c: compact_watts(w) for c, w in powers.items()}, "", core_ratio)

    @classmethod
    def from_error(cls, error: EstimatorError) -> EstimationReply:
        message = str(error)
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 3] + "..."
        return cls({}, message, error.core_ratio)

    def encode(self) -> bytes:
        body = {"powers": self.powers, "msg": self.msg, "core_ratio": round(self.core_ratio, 6)}
        return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


def compact_watts(watts: np.ndarray) -> list[float | int]:
    """Watts rounded to 1 mW; whole numbers written without ``.0`` to save reply bytes."""
    rounded = np.round(np.asarray(watts, dtype=float), WATT_DECIMALS) + 0.0  # no -0.0
    return [int(v) if v.is_integer() and abs(v) < 1e15 else v for v in rounded.tolist()]
